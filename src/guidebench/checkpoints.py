"""Checkpoint files: existence, hash and key checks with errors that say how to fix them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch


class CheckpointError(RuntimeError):
    """A checkpoint or weights file is missing, corrupt, or does not fit the model."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_file(path: str | Path, *, source: str, sha256: str | None = None, config_key: str | None = None) -> Path:
    """Return `path` if it exists (and matches `sha256`), else raise CheckpointError.

    source:     where the file comes from / how to make it (URL or command), shown to the user.
    config_key: the config key that sets this path, so the user knows what to override.
    """
    path = Path(path).expanduser()
    key = f" (set {config_key}=PATH)" if config_key else ""
    expected = f"; expected sha256 {sha256}" if sha256 else ""
    if not path.is_file():
        raise CheckpointError(f"missing file {path}{key}. Get it from: {source}{expected}{download_advice(path)}")
    if sha256:
        actual = sha256_file(path)
        if actual != sha256:
            raise CheckpointError(
                f"wrong file {path}{key}: sha256 {actual} but expected {sha256}. Get the right one from: {source}"
                f"{download_advice(path)}"
            )
    return path


def download_advice(path: Path) -> str:
    """'. Or run: guidebench-download NAME' when `path` is a file of the registry (conf/checkpoints.yaml)."""
    from guidebench import download

    hint = download.download_hint(path)
    return f". Or run: {hint}" if hint else ""


def load_torch_file(path: str | Path, *, source: str, sha256: str | None = None,
                    config_key: str | None = None) -> object:
    """torch.load(weights_only=True) with require_file's checks and a clear error for unreadable files."""
    path = require_file(path, source=source, sha256=sha256, config_key=config_key)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / non-weights files
        raise CheckpointError(f"cannot read {path} as a weights-only torch file ({e}). Expected: {source}") from e


def load_state_dict_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                            path: str | Path, source: str) -> None:
    """Strict load that names every missing key, unexpected key and shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state_dict.keys() if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{title}: {', '.join(items[:8])}{more}")
        raise CheckpointError(f"{path} does not fit {type(module).__name__} ({source}): " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
