"""run.json, the manifest of a sampling run, and the check that a run folder holds exactly the set it lists.

    {"fingerprint": {...},                 what determines the samples (guidebench.sampling.fingerprint)
     "num_samples": N, "shard_size": S,    the requested set: indices [0, N) in shards of S
     "overrides": [...],                   the sampling call's command-line overrides
     "shards": [{"shard": k, "file": "shard-k.npz", "start": k S, "stop": min((k + 1) S, N),
                 "count": ..., "nonfinite": [...], "sha256": ..., "fingerprint": fingerprint_id(...),
                 "nfe": ..., "seconds": ..., ...}, ...],
     "written": ..., "nonfinite": ..., "nfe": ..., "classifier_nfe": ..., "sampling_seconds": ...,
     "samples_per_second": ..., "device": ...}

A shard is listed only after its file was renamed into place (guidebench.shards). A set is complete when
the listed shards whose files still have their recorded sha256 cover [0, N), every index once, as an image
or as a listed non-finite sample.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guidebench.checkpoints import sha256_file
from guidebench.shards import ShardError, fingerprint_id, list_shards, read_shard, shard_bounds, shard_name

ENTRY_KEYS = ("shard", "file", "start", "stop", "count", "nonfinite", "sha256", "fingerprint")


class ManifestError(ShardError):
    """run.json is unreadable or inconsistent (edited by hand or damaged)."""


class IncompleteRunError(ShardError):
    """A run folder's shards are not exactly the set its run.json lists."""


def run_folder(path: str | Path) -> Path:
    """The run folder of a run or shard folder (a folder named shards/ next to a run.json is its run's)."""
    path = Path(path)
    return path.parent if path.name == "shards" and (path.parent / "run.json").is_file() else path


def sample_command(run: Path, manifest: dict | None) -> str:
    """The guidebench-sample call that completes the run in `run` (finished shards are skipped)."""
    overrides = manifest.get("overrides") if isinstance(manifest, dict) else None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return f"guidebench-sample <the overrides that made it> sampling.out_dir={shlex.quote(str(run.resolve()))}"
    return shlex.join(["guidebench-sample", *overrides, f"sampling.out_dir={run.resolve()}"])


def read_manifest(run: str | Path) -> dict:
    """run/run.json, checked for consistency; raises ManifestError naming what is wrong and the fix."""
    run = Path(run)
    path = run / "run.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{run} has no run.json manifest: re-run the guidebench-sample call that made it with "
                            f"sampling.out_dir={run}, or score the shards as they are with "
                            "evaluation.allow_incomplete=true") from None
    except (OSError, ValueError) as e:
        raise ManifestError(_unmatched(path, f"is not readable JSON ({e})", None)) from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict) \
            or not manifest["fingerprint"]:
        raise ManifestError(_unmatched(path, "has no fingerprint", manifest))
    if "shards" not in manifest:
        raise ManifestError(f"{path} lists no shards: it predates guidebench's manifest, or was edited. Nothing was "
                            "deleted. Re-run its sampling call to write it (shards without a record are sampled "
                            f"again):\n  {sample_command(run, manifest)}")
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestError(_damaged(path, problem, manifest))
    fid = fingerprint_id(manifest["fingerprint"])
    if any(entry["fingerprint"] != fid for entry in manifest["shards"]):
        raise ManifestError(_unmatched(path, "has a fingerprint its shards were not written for", manifest))
    return manifest


def _unmatched(path: Path, problem: str, manifest) -> str:
    return (f"{path} {problem}: it was edited by hand or damaged, and nothing ties its shards to a configuration "
            "any more. Nothing was deleted. Restore run.json from a copy, or sample the set again from scratch: "
            f"{sample_command(path.parent, manifest)} sampling.overwrite=true")


def _damaged(path: Path, problem: str, manifest: dict | None) -> str:
    return (f"{path} is not a consistent guidebench manifest: {problem}. It was edited by hand or damaged; nothing "
            "was deleted. Rebuild it from the shards' own records (finished shards are skipped, the others "
            f"re-sampled):\n  {sample_command(path.parent, manifest)}")


def _manifest_problem(manifest: dict) -> str | None:
    n, size, fingerprint = manifest.get("num_samples"), manifest.get("shard_size"), manifest["fingerprint"]
    if not (_is_int(n) and _is_int(size) and n > 0 and size > 0):
        return f"num_samples and shard_size must be positive integers, got {n!r} and {size!r}"
    for key, value in (("num_samples", n), ("shard_size", size)):
        if key in fingerprint and fingerprint[key] != value:
            return f"{key} is {value} but the fingerprint says {fingerprint[key]}"
    shards = manifest["shards"]
    if not isinstance(shards, list):
        return "'shards' is not a list"
    seen = set()
    for entry in shards:
        problem = _entry_problem(entry, n, size)
        if problem:
            return problem
        if entry["shard"] in seen:
            return f"shard {entry['shard']} is listed twice"
        seen.add(entry["shard"])
    return None


def _entry_problem(entry, n: int, size: int) -> str | None:
    if not isinstance(entry, dict) or any(key not in entry for key in ENTRY_KEYS):
        return f"a shard entry lacks one of {', '.join(ENTRY_KEYS)}: {str(entry)[:200]}"
    k, count, nonfinite = entry["shard"], entry["count"], entry["nonfinite"]
    num_shards = math.ceil(n / size)
    if not _is_int(k) or not 0 <= k < num_shards:
        return f"shard {k!r} is outside the run's {num_shards} shards of {size} (of {n} samples)"
    start, stop = shard_bounds(k, n, size)
    if entry["file"] != shard_name(k):
        return f"shard {k} names the file {entry['file']!r}, not {shard_name(k)}"
    if (entry["start"], entry["stop"]) != (start, stop):
        return f"shard {k} covers [{entry['start']}, {entry['stop']}), but shard {k} of this run is [{start}, {stop})"
    if not isinstance(nonfinite, list) or not all(_is_int(i) and start <= i < stop for i in nonfinite) \
            or len(set(nonfinite)) != len(nonfinite):
        return f"shard {k}'s non-finite indices are not distinct indices of [{start}, {stop})"
    if not _is_int(count) or count + len(nonfinite) != stop - start:
        return (f"shard {k} lists {count!r} samples and {len(nonfinite)} non-finite ones, but [{start}, {stop}) "
                f"holds {stop - start}")
    if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        return f"shard {k}'s sha256 {entry['sha256']!r} is not a sha256 hex digest"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def index_ranges(mask: np.ndarray) -> list[tuple[int, int]]:
    """The maximal [a, b) runs of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def format_ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in ranges)


@dataclass
class Coverage:
    """What a run folder's shard files hold, measured against its manifest."""

    run: Path
    manifest: dict
    valid: list[Path] = field(default_factory=list)      # listed shards with their recorded sha256, in order
    missing: list[tuple[int, int]] = field(default_factory=list)
    duplicated: list[tuple[int, int, list[str]]] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)     # listed, readable, another sha256
    unlisted: list[str] = field(default_factory=list)    # readable files of this run's shards, not listed
    stray: list[str] = field(default_factory=list)       # readable files outside this run's shards

    @property
    def complete(self) -> bool:
        """Whether the valid shards cover [0, num_samples)."""
        return not self.missing

    @property
    def clean(self) -> bool:
        """Complete, and no other shard file in the folder."""
        return not (self.missing or self.duplicated or self.corrupt or self.changed or self.unlisted or self.stray)

    def problems(self) -> list[str]:
        lines = []
        if self.missing:
            size = self.manifest["shard_size"]
            shards = sorted({k for a, b in self.missing for k in range(a // size, (b - 1) // size + 1)})
            names = ", ".join(shard_name(k) for k in shards[:8]) + (f", +{len(shards) - 8}" if len(shards) > 8 else "")
            lines.append(f"missing indices: {format_ranges(self.missing)} (shard files {names})")
        for a, b, files in self.duplicated:
            lines.append(f"duplicated indices: [{a}, {b}) (in {', '.join(files)})")
        lines += [f"corrupt shard file: {name} ({reason})" for name, reason in self.corrupt.items()]
        if self.changed:
            lines.append(f"shard files whose sha256 differs from run.json: {', '.join(self.changed)}")
        if self.unlisted:
            lines.append(f"shard files not listed in run.json: {', '.join(self.unlisted)} (the command below "
                         "re-samples or lists them)")
        if self.stray:
            num_shards = math.ceil(self.manifest["num_samples"] / self.manifest["shard_size"])
            lines.append(f"shard files outside this run's {num_shards} shards: {', '.join(self.stray)} "
                         "(move them out of the folder)")
        return lines

    def message(self) -> str:
        n, size = self.manifest["num_samples"], self.manifest["shard_size"]
        problems = "\n".join(f"  {line}" for line in self.problems())
        return (f"{self.run} does not hold the sample set its run.json lists ({n} samples in shards of {size}); "
                f"refusing to score it, as FID and the other metrics depend on the number of samples:\n{problems}\n"
                "Nothing was deleted. Complete the set (finished shards are skipped; missing, corrupt and changed "
                f"ones are sampled again):\n  {sample_command(self.run, self.manifest)}\n"
                "or score the verified shards as they are with evaluation.allow_incomplete=true "
                '(metrics.json then records "complete": false).')


def check_run(run: str | Path) -> Coverage:
    """Measure a run folder's shard files against its manifest (hashing each file once)."""
    run = run_folder(run)
    manifest = read_manifest(run)
    n, size = manifest["num_samples"], manifest["shard_size"]
    listed = {entry["shard"]: entry for entry in manifest["shards"]}
    coverage = Coverage(run, manifest)
    covered = np.zeros(n, dtype=bool)
    holders: dict[str, np.ndarray] = {}
    for path in list_shards(run):
        match = re.fullmatch(r"shard-(\d+)\.npz", path.name)
        k = int(match.group(1)) if match else -1
        ours = path.name == shard_name(k) and k < math.ceil(n / size)
        entry = listed.get(k) if ours else None
        if entry is not None and sha256_file(path) == entry["sha256"]:
            coverage.valid.append(path)
            covered[entry["start"]:entry["stop"]] = True
            held = np.arange(entry["start"], entry["stop"])
        else:
            try:
                data = read_shard(path)
            except ShardError as e:
                coverage.corrupt[path.name] = str(e.__cause__ or e)
                continue
            (coverage.changed if entry is not None else coverage.unlisted if ours else coverage.stray).append(path.name)
            held = np.concatenate([data["indices"], data["nonfinite"]])
        holders[path.name] = held[(held >= 0) & (held < n)]
    coverage.missing = index_ranges(~covered)
    counts = np.zeros(n, dtype=np.int64)
    for held in holders.values():
        np.add.at(counts, held, 1)
    for a, b in index_ranges(counts > 1):
        files = [name for name, held in holders.items() if ((held >= a) & (held < b)).any()]
        coverage.duplicated.append((a, b, files))
    return coverage
