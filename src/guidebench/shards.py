"""Sample shards: the on-disk form of a sampling run.

    out_dir/run.json                   the manifest (guidebench.manifest): what made the samples, how many,
                                       and every finished shard with its range, count and sha256
    out_dir/shards/shard-000000.npz    shard k holds global indices [k S, (k + 1) S)
    out_dir/shards/shard-000000.json   its record, renamed into place after the shard itself

Each shard is an `.npz` in the ADM evaluator's format, `arr_0` uint8 [N, H, W, C] and `arr_1` int64 [N]
labels, plus `indices` and `seeds` (int64 [N], each sample's global index and seed) and
`nonfinite` (int64: global indices whose sample had NaN/inf and was left out). Shard k depends only on
k, never on the number of processes, and the same arrays give the same bytes, so a re-run skips finished
shards, redoes the others and ends with the files of an uninterrupted run.

Concurrency: every process writes only its own shards and their records (each renamed atomically); the
main process merges the records into run.json (`ShardWriter.merge`). run.json is only ever replaced by a
rename, and updates of it hold an exclusive lock on out_dir/.run.json.lock, so concurrent runs on one
folder never lose each other's shards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from guidebench.checkpoints import sha256_file

SHARD_KEYS = ("arr_0", "arr_1", "indices", "seeds")


class ShardError(RuntimeError):
    """A shard folder or file is unusable: corrupt, mixed with another config, or missing."""


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.npz"


def shard_bounds(k: int, num_samples: int, shard_size: int) -> tuple[int, int]:
    """[start, stop) of shard k."""
    return k * shard_size, min((k + 1) * shard_size, num_samples)


def fingerprint_id(fingerprint: dict) -> str:
    """A short hash of a fingerprint, stored in each shard's record: it ties the shard to its configuration."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextmanager
def manifest_lock(out_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock that serialises updates of out_dir/run.json."""
    with open(out_dir / ".run.json.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with a fixed member timestamp: the same arrays always give the same bytes (and sha256)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


class ShardWriter:
    """Writes the shards of one run of `num_samples` samples in shards of `shard_size`.

    The main process calls `prepare` first (it refuses a folder holding samples of another configuration)
    and `merge` last; every process may `write` shards and ask whether one is `done`.
    """

    def __init__(self, out_dir: str | Path, fingerprint: dict, *, num_samples: int, shard_size: int):
        if num_samples < 1 or shard_size < 1:
            raise ValueError(f"num_samples and shard_size must be positive, got {num_samples} and {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_dir = self.out_dir / "shards"
        self.run_json = self.out_dir / "run.json"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.fingerprint_id = fingerprint_id(self.fingerprint)
        self.num_samples, self.shard_size = int(num_samples), int(shard_size)
        self.num_shards = math.ceil(self.num_samples / self.shard_size)

    def prepare(self, *, overwrite: bool = False, overrides: list[str] | None = None) -> "ShardWriter":
        """Check the folder and write run.json's header; `overrides`: the sampling call's command-line
        overrides, from which an incomplete set's completing command is built (None: unknown). Returns self."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with manifest_lock(self.out_dir):
            shards = []
            if overwrite:
                shutil.rmtree(self.shard_dir, ignore_errors=True)
            elif self.run_json.exists():
                shards = self._check_resumable()
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_json, {"fingerprint": self.fingerprint, "num_samples": self.num_samples,
                                       "shard_size": self.shard_size, "overrides": overrides,
                                       "shards": shards})
        return self

    def _check_resumable(self) -> list:
        """The shard list of the run.json in out_dir, if it was made by this configuration; else refuse."""
        fix = "Choose another sampling.out_dir, or set sampling.overwrite=true to delete its shards and start over."
        try:
            old = json.loads(self.run_json.read_text())
        except (OSError, ValueError) as e:
            raise ShardError(f"{self.run_json} is unreadable ({e}), so its shards cannot be matched to this "
                             f"configuration; nothing was changed. Restore it, or: {fix}") from e
        if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), dict) or not old["fingerprint"]:
            raise ShardError(f"{self.run_json} has no fingerprint, so its shards cannot be matched to this "
                             f"configuration; nothing was changed. Restore it, or: {fix}")
        if old["fingerprint"] != self.fingerprint:
            fp = old["fingerprint"]
            diff = sorted(k for k in fp.keys() | self.fingerprint.keys() if fp.get(k) != self.fingerprint.get(k))
            raise ShardError(f"{self.out_dir} holds samples of a different configuration (differs in: "
                             f"{', '.join(diff)}); refusing to mix them. {fix}")
        return old["shards"] if isinstance(old.get("shards"), list) else []

    def path(self, k: int) -> Path:
        return self.shard_dir / shard_name(k)

    def record_path(self, k: int) -> Path:
        return self.path(k).with_suffix(".json")

    def record(self, k: int) -> dict | None:
        """Shard k's record, if it has one written for this configuration."""
        try:
            record = json.loads(self.record_path(k).read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(record, dict) and record.get("shard") == k and record.get("fingerprint") == self.fingerprint_id
        return record if ok else None

    def done(self, k: int) -> bool:
        """Whether shard k is finished: it has a record and the file's sha256 is the one recorded."""
        record = self.record(k)
        try:
            return record is not None and sha256_file(self.path(k)) == record.get("sha256")
        except OSError:
            return False

    def write(self, k: int, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, seeds: np.ndarray,
              nonfinite: np.ndarray | None = None, cost: dict | None = None) -> Path:
        """Atomically write shard k, then its record (the manifest entry, with `cost`: nfe, classifier_nfe,
        seconds, device). Its samples and non-finite indices must be exactly the shard's index range."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"shard images must be uint8 NHWC, got {images.dtype} {images.shape}")
        if not 0 <= k < self.num_shards:
            raise ValueError(f"shard {k} is outside the run's shards 0..{self.num_shards - 1}")
        start, stop = shard_bounds(k, self.num_samples, self.shard_size)
        nonfinite = np.asarray([] if nonfinite is None else nonfinite, dtype=np.int64)
        if not np.array_equal(np.sort(np.concatenate([indices, nonfinite])), np.arange(start, stop)):
            raise ValueError(f"shard {k} must hold the indices [{start}, {stop}), each once, as a sample or a "
                             f"non-finite index")
        path = self.path(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # hidden: never listed as a shard
        save_npz(tmp, {"arr_0": images, "arr_1": labels.astype(np.int64), "indices": indices.astype(np.int64),
                       "seeds": seeds.astype(np.int64), "nonfinite": nonfinite})
        sha256 = sha256_file(tmp)
        os.replace(tmp, path)
        write_json(self.record_path(k), {"shard": k, "file": path.name, "start": start, "stop": stop,
                                         "count": int(len(images)), "nonfinite": nonfinite.tolist(),
                                         "sha256": sha256, "fingerprint": self.fingerprint_id, **(cost or {})})
        return path

    def merge(self) -> dict:
        """List every recorded shard in run.json, with the run's totals and cost; returns the manifest.

        nfe, classifier_nfe: per sample, over the listed shards; sampling_seconds: the sum of the shards'
        wall-clock times (over resumes and processes); samples_per_second: samples / sampling_seconds.
        """
        with manifest_lock(self.out_dir):
            manifest = json.loads(self.run_json.read_text())
            records = [r for r in map(self.record, range(self.num_shards)) if r is not None]
            manifest.update(shards=records, written=sum(r["count"] for r in records),
                            nonfinite=sum(len(r["nonfinite"]) for r in records), **_cost(records))
            write_json(self.run_json, manifest)
        return manifest


def _cost(records: list[dict]) -> dict:
    """The run's cost from its shards' records (None where a record lacks it)."""
    sizes = [r["stop"] - r["start"] for r in records]

    def per_sample(key: str) -> float | None:
        if not records or any(r.get(key) is None for r in records):
            return None
        return sum(r[key] * n for r, n in zip(records, sizes)) / sum(sizes)

    seconds = None if not records or any(r.get("seconds") is None for r in records) else \
        sum(r["seconds"] for r in records)
    devices = sorted({r["device"] for r in records if r.get("device")})
    return {"nfe": per_sample("nfe"), "classifier_nfe": per_sample("classifier_nfe"),
            "sampling_seconds": None if seconds is None else round(seconds, 3),
            "samples_per_second": round(sum(sizes) / seconds, 3) if seconds else None,
            "device": ", ".join(devices) or None}


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
        raise ShardError(f"corrupt shard {path}: {e}. Re-run the sampling call to regenerate it.") from e
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
