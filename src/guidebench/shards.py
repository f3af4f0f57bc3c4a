"""Sample shards: the on-disk form of a sampling run.

    out_dir/run.json                   what made the samples (fingerprint) and how many
    out_dir/shards/shard-000000.npz    shard k holds global indices [k S, (k + 1) S)

Each shard is an `.npz` in the ADM evaluator's format, `arr_0` uint8 [N, H, W, C] and `arr_1` int64 [N]
labels, plus `indices` and `seeds` (int64 [N], each sample's global index and seed) and
`nonfinite` (int64: global indices whose sample had NaN/inf and was left out). Shard k depends only on
k, never on the number of processes, so a re-run skips finished shards and resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

SHARD_KEYS = ("arr_0", "arr_1", "indices", "seeds")


class ShardError(RuntimeError):
    """A shard folder or file is unusable: corrupt, mixed with another config, or missing."""


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.npz"


class ShardWriter:
    """Writes shards of one run; refuses a folder that holds samples of another configuration."""

    def __init__(self, out_dir: str | Path, fingerprint: dict, *, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.shard_dir = self.out_dir / "shards"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        run_json = self.out_dir / "run.json"
        if run_json.exists() and not overwrite:
            old = json.loads(run_json.read_text()).get("fingerprint", {})
            if old != self.fingerprint:
                diff = sorted(k for k in old.keys() | self.fingerprint.keys() if old.get(k) != self.fingerprint.get(k))
                raise ShardError(
                    f"{self.out_dir} holds samples of a different configuration (differs in: {', '.join(diff)}); "
                    "refusing to mix them. Choose another sampling.out_dir or set sampling.overwrite=true."
                )
        elif overwrite and self.shard_dir.exists():
            shutil.rmtree(self.shard_dir)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        run_json.write_text(json.dumps({"fingerprint": self.fingerprint}, indent=2, sort_keys=True))

    def path(self, k: int) -> Path:
        return self.shard_dir / shard_name(k)

    def done(self, k: int) -> bool:
        """Whether shard k is complete and readable (a corrupt shard is redone)."""
        try:
            read_shard(self.path(k))
            return True
        except (ShardError, FileNotFoundError):
            return False

    def write(self, k: int, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, seeds: np.ndarray,
              nonfinite: np.ndarray | None = None) -> Path:
        """Atomically write shard k (a temporary file renamed into place)."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"shard images must be uint8 NHWC, got {images.dtype} {images.shape}")
        path = self.path(k)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, arr_0=images, arr_1=labels.astype(np.int64), indices=indices.astype(np.int64),
                 seeds=seeds.astype(np.int64),
                 nonfinite=np.asarray([] if nonfinite is None else nonfinite, dtype=np.int64))
        os.replace(tmp, path)
        return path


def list_shards(path: str | Path) -> list[Path]:
    """The shard files of a run folder (or its shards/ subfolder), in index order."""
    path = Path(path)
    folder = path / "shards" if (path / "shards").is_dir() else path
    if not folder.is_dir():
        raise ShardError(f"no shard folder at {path}")
    return sorted(folder.glob("shard-*.npz"))


def read_shard(path: str | Path) -> dict[str, np.ndarray]:
    """Load and validate one shard; a truncated or inconsistent file raises ShardError naming it."""
    path = Path(path)
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ShardError(f"corrupt shard {path}: {e}. Delete it and re-run sampling to regenerate it.") from e
    missing = [k for k in SHARD_KEYS if k not in data]
    if missing:
        raise ShardError(f"shard {path} lacks {', '.join(missing)}; not a guidebench shard")
    n = len(data["arr_0"])
    if data["arr_0"].dtype != np.uint8 or data["arr_0"].ndim != 4 or any(len(data[k]) != n for k in SHARD_KEYS[1:]):
        raise ShardError(f"shard {path} is inconsistent: images {data['arr_0'].dtype} {data['arr_0'].shape}, "
                         f"{', '.join(f'{k} {len(data[k])}' for k in SHARD_KEYS[1:])}")
    data.setdefault("nonfinite", np.zeros(0, dtype=np.int64))
    return data


def iter_shards(path: str | Path) -> Iterator[dict[str, np.ndarray]]:
    for shard in list_shards(path):
        yield read_shard(shard)


def export_npz(run_dir: str | Path, out: str | Path) -> Path:
    """Merge a run's shards into one ADM-evaluator npz (arr_0 images, arr_1 labels), in index order."""
    shards = list(iter_shards(run_dir))
    if not shards:
        raise ShardError(f"no shards in {run_dir}")
    order = np.argsort(np.concatenate([s["indices"] for s in shards]), kind="stable")
    images = np.concatenate([s["arr_0"] for s in shards])[order]
    labels = np.concatenate([s["arr_1"] for s in shards])[order]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, arr_0=images, arr_1=labels)
    return out
