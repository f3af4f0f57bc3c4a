"""The README's command lines on the shipped digits models, end to end, as a user runs them."""

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from guidebench.shards import list_shards, read_shard

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}


def cli(name, *args, cwd, check=True):
    proc = subprocess.run([str(BIN / name), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_run_writes_shards_metrics_summary_and_grid(tmp_path):
    run = tmp_path / "run"
    cli("guidebench-run", "backbone=digits", "guidance=cfg", "guidance.scale=2", "sampling.num_samples=512",
        "sampler.schedule.respacing=ddim25", f"hydra.run.dir={run}", "evaluation.cache_dir=" + str(tmp_path / "cache"),
        cwd=tmp_path)
    shards = [read_shard(p) for p in list_shards(run)]
    assert sum(len(s["arr_0"]) for s in shards) == 512 and shards[0]["arr_0"].shape[1:] == (8, 8, 1)
    assert np.array_equal(np.concatenate([s["indices"] for s in shards]), np.arange(512))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 512 and metrics["accuracy"] > 0.9 and metrics["fid"] > 0
    summary = (run / "summary.csv").read_text().splitlines()
    assert summary[0].split(",")[:7] == ["run", "backbone", "guidance", "classifier", "sampler", "scale", "num_samples"]
    assert summary[1].startswith("run,digits,cfg,,ddim,2,512,True,0,")  # complete, no non-finite sample
    (row,) = csv.DictReader(summary)
    assert float(row["nfe"]) == 50 and float(row["classifier_nfe"]) == 0  # CFG on DDIM-25: 2 per step
    assert float(row["sampling_seconds"]) > 0 and float(row["samples_per_second"]) > 0
    assert (run / "grid.png").stat().st_size > 0
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["fingerprint"]["guidance"] == "cfg" and manifest["fingerprint"]["scale"] == 2.0
    assert manifest["device"].startswith("cpu") and metrics["complete"] is True


def test_sweep_then_report_draws_the_tradeoff(tmp_path):
    sweep = tmp_path / "sweep"
    cli("guidebench-run", "-m", "backbone=digits", "guidance=cfg", "guidance.scale=1,2,4",
        "sampling.num_samples=200", f"hydra.sweep.dir={sweep}", "evaluation.cache_dir=" + str(tmp_path / "cache"),
        cwd=tmp_path)
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 3
    scales = sorted(json.loads((r / "run.json").read_text())["fingerprint"]["scale"] for r in runs)
    assert scales == [1.0, 2.0, 4.0]
    cli("guidebench-report", f"report.root={sweep}", cwd=tmp_path)
    table = (sweep / "summary.csv").read_text().splitlines()
    assert len(table) == 4 and (sweep / "tradeoff.png").stat().st_size > 0


def test_resume_refuse_and_nonfinite(tmp_path):
    out = tmp_path / "samples"
    args = ["backbone=digits", "sampling.num_samples=40", "sampling.shard_size=16", f"sampling.out_dir={out}",
            f"hydra.run.dir={tmp_path / 'h'}"]
    cli("guidebench-sample", *args, "guidance=none", cwd=tmp_path)
    stamps = [p.stat().st_mtime_ns for p in list_shards(out)]
    assert len(stamps) == 3
    cli("guidebench-sample", *args, "guidance=none", "sampling.batch_size=7", cwd=tmp_path)  # resumes: nothing to do
    assert [p.stat().st_mtime_ns for p in list_shards(out)] == stamps
    refused = cli("guidebench-sample", *args, "guidance=cfg", cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "different configuration" in refused.stderr
    assert [p.stat().st_mtime_ns for p in list_shards(out)] == stamps  # nothing lost
    bad = cli("guidebench-sample", *args, "guidance=cfg", "guidance.scale=1e30", "sampling.overwrite=true",
              cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "NaN/inf" in bad.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["nonfinite"] + info["written"] == 40 and info["nonfinite"] > 0


def test_a_deleted_shard_is_refused_then_completed_by_the_printed_command(tmp_path):
    """64 digits in 4 shards, one deleted: evaluate names [16, 32) and the command that completes the set; the
    command rewrites that shard only, byte for byte (allow_incomplete: tests/test_manifest.py)."""
    out = tmp_path / "samples"
    cli("guidebench-sample", "backbone=digits", "sampling.num_samples=64", "sampling.shard_size=16",
        "sampler.schedule.respacing=ddim5", f"sampling.out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    uninterrupted = {p.name: p.read_bytes() for p in list_shards(out)}
    (out / "shards" / "shard-000001.npz").unlink()
    evaluate = ["guidebench-evaluate", f"evaluation.samples={out}", f"evaluation.cache_dir={tmp_path / 'cache'}",
                f"hydra.run.dir={tmp_path / 'he'}"]
    refused = cli(*evaluate, cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "missing indices: [16, 32)" in refused.stderr
    assert not (out / "metrics.json").exists()
    command = next(line.strip() for line in refused.stderr.splitlines() if line.strip().startswith("guidebench-sample"))
    kept = (out / "shards" / "shard-000000.npz").stat().st_mtime_ns
    cli(*shlex.split(command), cwd=tmp_path)
    assert {p.name: p.read_bytes() for p in list_shards(out)} == uninterrupted
    assert (out / "shards" / "shard-000000.npz").stat().st_mtime_ns == kept  # finished shards were skipped


@pytest.mark.parametrize("method", [
    ["guidance=eds", "guidance.scale=3"],
    ["guidance=eds", "guidance.scale=3", "classifier=digits_noisy_ect"],
    ["guidance=elucd", "guidance.scale=1", "classifier=digits_clean", "sampler=ddpm", "sampler.schedule.respacing=25"],
], ids=["eds", "eds-ect", "elucd"])
def test_seed_methods_lift_the_unconditional_models_accuracy(tmp_path, method):
    """Unguided digits_uncond samples are ~10% the requested class (README table); these methods reach far above."""
    run = tmp_path / "run"
    cli("guidebench-run", "backbone=digits_uncond", *method, "sampling.num_samples=64", f"hydra.run.dir={run}",
        "evaluation.cache_dir=" + str(tmp_path / "cache"), cwd=tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 64 and metrics["accuracy"] > 0.6


def test_elucd_ddpm_branch_refuses_ddim_before_sampling(tmp_path):
    out = tmp_path / "samples"
    proc = cli("guidebench-sample", "backbone=digits_uncond", "guidance=elucd", "classifier=digits_clean",
               "sampling.num_samples=8", f"sampling.out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}",
               cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "use sampler=ddpm" in proc.stderr
    assert not list(out.rglob("shard-*.npz"))  # refused before anything was sampled


def test_unknown_backbone_lists_choices(tmp_path):
    proc = cli("guidebench-sample", "backbone=imagenet_nope", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "digits_uncond" in proc.stderr


def test_two_processes_write_the_same_shards_as_one(tmp_path):
    """`accelerate launch --multi_gpu` (gloo on CPU with sampling.device=cpu; `--cpu --num_processes 2` would
    start one process): process r of 2 writes shards r, r + 2, ..., byte-identical to one process."""
    import socket

    common = ["backbone=digits", "guidance=cfg", "sampling.num_samples=48", "sampling.shard_size=12",
              "sampling.device=cpu", "sampler.schedule.respacing=ddim10"]
    cli("guidebench-sample", *common, f"sampling.out_dir={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'h1'}",
        cwd=tmp_path)
    with socket.socket() as s:  # a free port for the rendezvous, not the default 29500 other runs may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "guidebench.cli.sample", *common, f"sampling.out_dir={tmp_path / 'two'}",
                    "sampling.batch_size=5", f"hydra.run.dir={tmp_path / 'h2'}"],
                   cwd=tmp_path, env={**ENV, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=900)
    one, two = list_shards(tmp_path / "one"), list_shards(tmp_path / "two")
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 4
    assert [json.loads(p.with_suffix(".json").read_text())["process"] for p in two] == [0, 1, 0, 1]
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]  # batch 250 vs 5 too


def test_optuna_search_minimises_fid_and_the_report_names_the_best_trial(tmp_path):
    """hydra/sweeper=optuna over a method's scale: 4 trials on digits; guidebench-run returns FID, the report
    names the best point and keeps every trial in its table."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "search"
    cli("guidebench-run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.direction=minimize",
        "hydra.sweeper.sampler.seed=0", "backbone=digits", "guidance=apg", "guidance.scale=interval(1.0,4.0)",
        "sampler.schedule.respacing=ddim10", "sampling.num_samples=64", f"hydra.sweep.dir={sweep}",
        "evaluation.cache_dir=" + str(tmp_path / "cache"), cwd=tmp_path)
    fids = {p.parent.name: json.loads(p.read_text())["fid"] for p in sweep.rglob("metrics.json")}
    assert len(fids) == 4
    report = cli("guidebench-report", f"report.root={sweep}", cwd=tmp_path)
    best = min(fids, key=fids.get)
    line = (sweep / "search.txt").read_text().strip()
    assert line.startswith("best of 4 trials: guidance.scale=") and f"(trial {best})" in line
    assert f"FID {fids[best]:.4g}" in line and line in report.stdout
    assert len((sweep / "summary.csv").read_text().splitlines()) == 5
