"""run.json as the manifest: incomplete, corrupt or hand-edited sample sets are refused by name, nothing is
deleted, a resume rewrites only the broken shards (byte-identical), foreign sources are scored as they are."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from guidebench.checkpoints import sha256_file
from guidebench.config import CONF_DIR
from guidebench.evaluation.evaluator import evaluate
from guidebench.manifest import IncompleteRunError, ManifestError, check_run
from guidebench.report import write_run_report
from guidebench.sampling import sample
from guidebench.shards import ShardError, export_npz, list_shards

OVERRIDES = ["backbone=digits", "guidance=none", "sampling.num_samples=64", "sampling.shard_size=16",
             "sampling.batch_size=16", "sampling.device=cpu", "sampler.schedule.respacing=ddim5"]


def compose_run(tmp: Path, out_dir: Path):
    """The guidebench-run config of OVERRIDES writing to out_dir, as Hydra would give it to the app."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[*OVERRIDES, f"hydra.run.dir={tmp / 'hydra'}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    cfg.paths.output_dir = str(tmp / "hydra")
    cfg.sampling.out_dir = str(out_dir)
    return cfg


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """64 digits in 4 shards of 16, sampled once for the module; tests work on copies."""
    tmp = tmp_path_factory.mktemp("manifest")
    run = tmp / "pristine"
    sample(compose_run(tmp, run))
    yield run
    GlobalHydra.instance().clear()


def copy_run(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "run"))


def score(pristine: Path, samples: Path, out_dir: Path | None = None, **kw) -> dict:
    """guidebench-evaluate's call with the shipped digits suite (metrics.json into out_dir, default samples)."""
    cfg = compose_run(pristine.parent, pristine)
    suite = OmegaConf.to_container(cfg.metrics, resolve=True)
    return evaluate(samples, None, suite, out_dir or samples, cache_dir=pristine.parent / "cache", device="cpu",
                    verbose=False, **kw)


def listed_hashes(run: Path) -> list[str]:
    return [e["sha256"] for e in json.loads((run / "run.json").read_text())["shards"]]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def summary_row(run: Path) -> dict[str, str]:
    write_run_report(run, grid=False)
    with open(run / "summary.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    return row


def test_run_json_lists_every_shard_with_its_hash_and_the_cost(pristine, tmp_path):
    manifest = json.loads((pristine / "run.json").read_text())
    assert [manifest[k] for k in ("num_samples", "shard_size", "written", "nonfinite")] == [64, 16, 64, 0]
    assert [(e["shard"], e["start"], e["stop"], e["count"], e["nonfinite"]) for e in manifest["shards"]] == \
        [(k, 16 * k, 16 * k + 16, 16, []) for k in range(4)]
    assert [e["sha256"] for e in manifest["shards"]] == [sha256_file(p) for p in list_shards(pristine)]
    assert (manifest["nfe"], manifest["classifier_nfe"]) == (5, 0)  # DDIM-5, unguided
    assert manifest["sampling_seconds"] > 0 and manifest["samples_per_second"] > 0
    assert manifest["device"].startswith("cpu")
    assert "sampling.num_samples=64" in manifest["overrides"]
    assert not any(o.startswith(("hydra.", "sampling.out_dir")) for o in manifest["overrides"])

    run = copy_run(pristine, tmp_path)
    metrics = score(pristine, run)
    assert (metrics["num_samples"], metrics["num_requested"], metrics["complete"]) == (64, 64, True)
    row = summary_row(run)
    assert (row["num_samples"], row["complete"], row["nonfinite"], row["nfe"], row["classifier_nfe"]) == \
        ("64", "True", "0", "5.0", "0.0")
    assert float(row["sampling_seconds"]) > 0 and float(row["samples_per_second"]) > 0


def test_missing_shards_are_refused_with_their_ranges_and_the_completing_command(pristine, tmp_path):
    run = copy_run(pristine, tmp_path)
    (run / "shards" / "shard-000001.npz").unlink()
    (run / "shards" / "shard-000003.npz").unlink()
    before = snapshot(run)
    with pytest.raises(IncompleteRunError) as refused:
        score(pristine, run)
    message = str(refused.value)
    assert "missing indices: [16, 32), [48, 64) (shard files shard-000001.npz, shard-000003.npz)" in message
    command = next(line.strip() for line in message.splitlines() if line.strip().startswith("guidebench-sample"))
    assert command.split()[1:] == [*OVERRIDES, f"sampling.out_dir={run.resolve()}"]
    assert "evaluation.allow_incomplete=true" in message
    assert snapshot(run) == before  # nothing deleted, no metrics.json


def test_corrupt_changed_duplicated_and_unlisted_shards_are_named(pristine, tmp_path):
    run = copy_run(pristine, tmp_path)
    shards = run / "shards"
    (shards / "shard-000001.npz").write_bytes((shards / "shard-000001.npz").read_bytes()[:500])  # truncated
    shutil.copy(shards / "shard-000000.npz", shards / "shard-000002.npz")  # readable, another hash, indices [0, 16)
    shutil.copy(shards / "shard-000000.npz", shards / "shard-000007.npz")  # a stray file
    before = snapshot(run)
    with pytest.raises(IncompleteRunError) as refused:
        score(pristine, run)
    message = str(refused.value)
    assert "missing indices: [16, 48)" in message
    assert "corrupt shard file: shard-000001.npz" in message
    assert "sha256 differs from run.json: shard-000002.npz" in message
    assert "duplicated indices: [0, 16) (in shard-000000.npz, shard-000002.npz, shard-000007.npz)" in message
    assert "outside this run's 4 shards: shard-000007.npz (move them out of the folder)" in message
    assert snapshot(run) == before


def test_allow_incomplete_scores_what_is_there_and_says_so(pristine, tmp_path, monkeypatch):
    from guidebench.cli.evaluate import main

    run = copy_run(pristine, tmp_path)
    (run / "shards" / "shard-000001.npz").unlink()
    monkeypatch.setattr(sys, "argv", [
        "guidebench-evaluate", f"evaluation.samples={run}", "evaluation.allow_incomplete=true",
        f"evaluation.cache_dir={pristine.parent / 'cache'}", "evaluation.device=cpu", "evaluation.verbose=false",
        f"hydra.run.dir={tmp_path / 'hydra'}"])
    GlobalHydra.instance().clear()
    main()
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["num_samples"], metrics["num_requested"], metrics["complete"]) == (48, 64, False)
    row = summary_row(run)
    assert (row["num_samples"], row["complete"]) == ("48", "False")


def test_resume_rewrites_only_the_broken_shards_byte_identically(pristine, tmp_path):
    run = copy_run(pristine, tmp_path)
    shards = run / "shards"
    (shards / "shard-000001.npz").unlink()
    (shards / "shard-000002.npz").write_bytes((shards / "shard-000002.npz").read_bytes()[:500])
    kept = {k: (shards / f"shard-00000{k}.npz").stat().st_mtime_ns for k in (0, 3)}
    sample(compose_run(tmp_path, run))
    assert {k: (shards / f"shard-00000{k}.npz").stat().st_mtime_ns for k in (0, 3)} == kept
    assert [p.read_bytes() for p in list_shards(run)] == [p.read_bytes() for p in list_shards(pristine)]
    assert listed_hashes(run) == listed_hashes(pristine)
    assert check_run(run).clean


@pytest.mark.parametrize("edit, error", [
    (lambda m: m["shards"][1].update(count=15), r"shard 1 lists 15 samples and 0 non-finite ones, but \[16, 32\)"),
    (lambda m: m["shards"][2].update(start=30), r"shard 2 covers \[30, 48\), but shard 2 of this run is \[32, 48\)"),
    (lambda m: m.update(num_samples=48), "num_samples is 48 but the fingerprint says 64"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), "shard 0 is listed twice"),
    (lambda m: m["shards"][3].update(sha256="abc"), "not a sha256"),
], ids=["count", "range", "num_samples", "twice", "sha256"])
def test_a_hand_edited_manifest_is_refused_and_rebuilt_by_resampling(pristine, tmp_path, edit, error):
    run = copy_run(pristine, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    edit(manifest)
    (run / "run.json").write_text(json.dumps(manifest))
    before = snapshot(run)
    with pytest.raises(ManifestError, match=error) as refused:
        score(pristine, run)
    assert "edited by hand or damaged; nothing was deleted" in str(refused.value)
    assert f"sampling.out_dir={run.resolve()}" in str(refused.value)
    assert snapshot(run) == before
    sample(compose_run(tmp_path, run))  # the fix the error names: the shards' records rebuild run.json
    assert check_run(run).clean
    assert [p.read_bytes() for p in list_shards(run)] == [p.read_bytes() for p in list_shards(pristine)]


def test_a_manifest_without_its_shard_list_is_refused_and_rebuilt_by_resampling(pristine, tmp_path):
    run = copy_run(pristine, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    del manifest["shards"]  # as a run.json written before the manifest
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="lists no shards.*Nothing was deleted"):
        score(pristine, run)
    sample(compose_run(tmp_path, run))
    assert check_run(run).clean and listed_hashes(run) == listed_hashes(pristine)


@pytest.mark.parametrize("damage, evaluate_error, sample_error", [
    ("removed", "has no fingerprint", "has no fingerprint, so its shards cannot be matched"),
    ("edited", "has a fingerprint its shards were not written for", "different configuration .differs in: scale"),
    ("json", "not readable JSON", "is unreadable"),
])
def test_a_manifest_without_its_fingerprint_is_refused_by_evaluate_and_sample(pristine, tmp_path, damage,
                                                                              evaluate_error, sample_error):
    run = copy_run(pristine, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    if damage == "removed":
        del manifest["fingerprint"]
    elif damage == "edited":
        manifest["fingerprint"]["scale"] = 3.0
    (run / "run.json").write_text("{not json" if damage == "json" else json.dumps(manifest))
    before = snapshot(run)
    with pytest.raises(ManifestError, match=evaluate_error) as refused:
        score(pristine, run)
    assert "nothing was deleted" in str(refused.value).lower()
    with pytest.raises(ShardError, match=f"{sample_error}.*sampling.overwrite=true"):
        sample(compose_run(tmp_path, run))
    assert snapshot(run) == before


def test_foreign_sources_are_scored_as_they_are(pristine, tmp_path):
    npz = export_npz(pristine, tmp_path / "samples.npz")
    out = tmp_path / "npz_scores"
    metrics = score(pristine, npz, out)
    assert (metrics["num_samples"], metrics["num_requested"], metrics["complete"]) == (64, None, None)
    row = summary_row(out)
    assert (row["num_samples"], row["complete"], row["nfe"]) == ("64", "", "")

    bare = Path(shutil.copytree(pristine / "shards", tmp_path / "bare"))  # shard files without a run.json
    with pytest.raises(IncompleteRunError, match="no run.json manifest.*allow_incomplete=true"):
        score(pristine, bare, tmp_path / "bare_scores")
    assert score(pristine, bare, tmp_path / "bare_scores", allow_incomplete=True)["complete"] is False


def test_writer_checks_ranges_and_writes_the_same_bytes(tmp_path):
    from guidebench.shards import ShardWriter

    images, idx = np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8, 1), np.arange(4, 8)
    paths = []
    for name in ("a", "b"):
        writer = ShardWriter(tmp_path / name, {"x": 1}, num_samples=10, shard_size=4).prepare()
        paths.append(writer.write(1, images, idx % 3, idx, idx))
        assert json.loads((tmp_path / name / "run.json").read_text())["shards"] == []  # listed only by merge
        assert [e["shard"] for e in writer.merge()["shards"]] == [1]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with pytest.raises(ValueError, match=r"indices \[4, 8\)"):
        writer.write(1, images[:3], idx[:3], idx[:3], idx[:3])  # one sample neither written nor non-finite
    with pytest.raises(ValueError, match="outside the run's shards 0..2"):
        writer.write(3, images, idx, idx, idx)
