"""W&B offline runs read back from their files: a sample and an evaluate run per setting grouped by the sweep,
and the report's summary run with the table of all settings and the trade-off plots."""

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from guidebench.cli.report import main as report_main
from guidebench.cli.run import run
from guidebench.loggers import FILTER_KEYS, num_steps
from guidebench.report import COLUMNS, METRICS, nfe_figure, write_grid
from guidebench.schedules import space_timesteps
from tests.test_cli import cli


def read_wandb(folder: Path, job_type: str) -> dict:
    """The one offline run of `job_type` under folder/wandb."""
    runs = [read_offline_run(offline) for offline in sorted((folder / "wandb").glob("offline-run-*"))]
    (run,) = [r for r in runs if r["job_type"] == job_type]
    return run


def read_offline_run(offline: Path) -> dict:
    """An offline run's record (config, group, job_type) and final summary, parsed from its .wandb file (LevelDB
    log format: 32 KiB blocks of [crc32c u32, length u16, type u8] chunks after a 7-byte W&B header; type 1 full,
    2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = offline.glob("*.wandb")
    data, pos, chunks, records = log.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is zero padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    (run,) = [r.run for r in records if r.HasField("run")]
    summary = {}
    for r in records:
        for item in r.summary.update if r.HasField("summary") else ():
            keys = list(item.nested_key) or [item.key]
            node = summary
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
    return {"files": offline / "files", "group": run.run_group, "job_type": run.job_type, "name": run.display_name,
            "config": {u.key: json.loads(u.value_json) for u in run.config.update}, "summary": summary}


def media(run: dict, key: str) -> Path:
    path = run["files"] / run["summary"][key]["path"]
    assert path.is_file(), f"{key} is not in the run's files"
    return path


def check_run(job: Path, group: str, respacing: str, stages=("sample", "evaluate")) -> None:
    """The job's W&B runs of `stages` against its run.json, metrics.json and grid.png."""
    manifest = json.loads((job / "run.json").read_text())
    fingerprint = manifest["fingerprint"]
    for stage in stages:
        run = read_wandb(job, stage)
        assert (run["group"], run["name"]) == (group, job.name)
        config, summary = run["config"], run["summary"]
        assert {k: config[k] for k in FILTER_KEYS if k != "steps"} == {k: fingerprint[k] for k in FILTER_KEYS if k != "steps"}
        assert config["steps"] == len(space_timesteps(1000, respacing))
        assert summary["nfe"] == manifest["nfe"] and summary["classifier_nfe"] == manifest["classifier_nfe"]
        assert np.array_equal(np.asarray(Image.open(media(run, "grid"))), np.asarray(Image.open(job / "grid.png")))
        if stage == "sample":
            assert config["cfg"]["sampling"]["num_samples"] == fingerprint["num_samples"]
            assert config["cfg"]["guidance"]["scale"] == config["scale"]
            assert (summary["written"], summary["nonfinite"], summary["complete"]) == \
                (manifest["written"], manifest["nonfinite"], True)
            assert not any(k in summary for k in METRICS)
        else:
            metrics = json.loads((job / "metrics.json").read_text())
            scored = [k for k in (*METRICS, "num_samples", "nonfinite", "complete") if metrics.get(k) is not None]
            assert "fid" in scored and {k: summary[k] for k in scored} == {k: metrics[k] for k in scored}


def check_report(sweep: Path, group: str, num_runs: int) -> None:
    """The report's summary run: group, job_type, the table = summary.csv, the plots = the report's PNGs."""
    report = read_wandb(sweep, "report")
    assert report["group"] == group
    table = json.loads(media(report, "settings").read_text())
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert table["columns"] == list(COLUMNS) and len(table["data"]) == len(rows) == num_runs
    for got, want in zip(table["data"], rows):
        assert ["" if v is None else str(v) for v in got] == [want[k] for k in COLUMNS]
    for key in ("tradeoff", "fid_nfe"):
        assert np.array_equal(np.asarray(Image.open(media(report, key))), np.asarray(Image.open(sweep / f"{key}.png")))


def without_hydra_node(cfg):
    """A composed config as @hydra.main passes it (HydraConfig stays set)."""
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def test_each_setting_logs_a_run_grouped_by_the_sweep_and_the_report_a_summary_run(compose_cfg, tmp_path):
    torch.set_num_threads(1)
    sweep, respacing, scales = tmp_path / "cfg-sweep", "ddim10", (1.0, 3.0)
    for n, scale in enumerate(scales):
        run(without_hydra_node(compose_cfg("run", [
            "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}", "backbone=digits", "guidance=cfg",
            f"guidance.scale={scale}", "logger=wandb", "sampling.num_samples=16",
            f"sampler.schedule.respacing={respacing}", f"sampling.out_dir={sweep / str(n)}",
            f"evaluation.cache_dir={tmp_path / 'cache'}", *(["+paper.fid=10.0", "+paper.source=made up"] if n else [])])))
        check_run(sweep / str(n), sweep.name, respacing)
    report_main(without_hydra_node(compose_cfg("report", [f"report.root={sweep}", "logger=wandb",
                                                          "report.compare_paper=true"])))
    check_report(sweep, sweep.name, len(scales))
    table = json.loads(media(read_wandb(sweep, "report"), "paper_comparison").read_text())
    with open(sweep / "paper_comparison.csv") as f:
        (row,) = list(csv.DictReader(f))  # the run without a paper block is not compared
    assert table["columns"] == list(row) and len(table["data"]) == 1
    assert ["" if v is None else str(v) for v in table["data"][0]] == list(row.values())
    assert row["run"] == "1" and float(row["paper_fid"]) == 10.0
    assert float(row["diff_fid"]) == pytest.approx(float(row["fid"]) - 10.0)


def test_split_stages_log_a_sample_and_an_evaluate_run(tmp_path):
    """guidebench-sample then guidebench-evaluate (what a SLURM array and its evaluation job run) log the same two
    runs as guidebench-run."""
    job, respacing = tmp_path / "job", "ddim5"
    cli("guidebench-sample", "guidance=cfg", "guidance.scale=2", "logger=wandb", "logger.wandb.group=split",
        "sampling.num_samples=16", f"sampler.schedule.respacing={respacing}", f"sampling.out_dir={job}", cwd=tmp_path)
    assert len(list((job / "wandb").glob("offline-run-*"))) == 1
    cli("guidebench-evaluate", f"evaluation.samples={job}", "logger=wandb", "logger.wandb.group=split",
        f"evaluation.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    write_grid(job, job / "grid.png")  # what guidebench-report writes; the runs' grids must equal it
    check_run(job, "split", respacing)


@pytest.mark.slow
def test_cli_sweep_then_report_logs_to_wandb(tmp_path):
    """The same through the command lines a user types: guidebench-run -m, then guidebench-report."""
    sweep, respacing = tmp_path / "cfg-sweep", "ddim10"
    cli("guidebench-run", "-m", "backbone=digits", "guidance=cfg", "guidance.scale=1,3", "logger=wandb",
        "sampling.num_samples=32", f"sampler.schedule.respacing={respacing}", f"hydra.sweep.dir={sweep}",
        f"evaluation.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    jobs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(jobs) == 2
    for job in jobs:
        check_run(job, sweep.name, respacing)
    cli("guidebench-report", f"report.root={sweep}", "logger=wandb", cwd=tmp_path)
    check_report(sweep, sweep.name, len(jobs))


def test_fid_vs_nfe_figure_plots_each_setting_at_its_cost():
    rows = [{"backbone": "digits", "guidance": g, "classifier": None, "sampler": "ddim", "scale": s, "nfe": n, "fid": f}
            for g, s, n, f in (("cfg", 2.0, 50.0, 3.0), ("cfg", 1.0, 50.0, 5.0), ("none", None, 25.0, 9.0),
                               ("cfg", 4.0, 50.0, None))]
    (ax,) = nfe_figure(rows).axes
    points = {line.get_label(): sorted(zip(line.get_xdata(), line.get_ydata())) for line in ax.lines}
    assert points == {"digits / cfg / ddim": [(50.0, 3.0), (50.0, 5.0)], "digits / none / ddim": [(25.0, 9.0)]}


def test_num_steps_counts_the_respaced_and_karras_schedules():
    for respacing in ("ddim25", "250", "10,15,20", 40, [5, 5]):
        assert num_steps(OmegaConf.create({"respacing": respacing})) == len(space_timesteps(1000, respacing))
    assert num_steps(OmegaConf.create({"num_steps": 18, "rho": 7.0})) == 18
