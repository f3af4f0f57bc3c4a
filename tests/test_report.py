"""guidebench-report: per-run summaries and grids, the table over a multirun folder, the trade-off plot."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guidebench.paper_comparison import compare_paper, paper_evaluator, paper_report, paper_table
from guidebench.report import COLUMNS, find_runs, nfe_figure, report, sample_grid, summarize, tradeoff_figure
from guidebench.shards import ShardWriter

# (backbone, guidance, scale) of the fake sweep; metrics are made up from the index
SWEEP = [("digits", "cfg", 3.0), ("digits", "cfg", 1.0), ("digits", "classifier", 0.5), ("digits", "cfg", 2.0),
         ("digits", "classifier", 4.0), ("digits", "none", None)]


def make_run(run: Path, fingerprint: dict, images: np.ndarray, labels: np.ndarray, metrics: dict | None,
             shard_size: int = 5, cost: dict | None = None, overrides: list[str] | None = None) -> Path:
    writer = ShardWriter(run, fingerprint, num_samples=len(images), shard_size=shard_size).prepare(overrides=overrides)
    for k, start in enumerate(range(0, len(images), shard_size)):
        idx = np.arange(start, min(start + shard_size, len(images)))
        writer.write(k, images[idx], labels[idx], idx, idx, cost=cost)
    writer.merge()
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def fake_metrics(i: int) -> dict:
    return {"fid": 10.0 / (i + 1), "is": 2.0 + i, "precision": 0.5 + 0.05 * i, "recall": 0.9 - 0.1 * i,
            "kid": 0.01 * i, "accuracy": 0.7 + 0.01 * i, "num_samples": 12, "nonfinite": 0, "is_std": 0.1}


@pytest.fixture
def sweep(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "multirun"
    for i, (backbone, guidance, scale) in enumerate(SWEEP):
        make_run(root / f"{i}-{guidance}", {"backbone": backbone, "guidance": guidance, "scale": scale,
                                            "num_samples": 12, "seed": 0},
                 rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 12), fake_metrics(i))
    make_run(root / "not-evaluated", {"backbone": "x"}, np.zeros((3, 8, 8, 1), np.uint8), np.zeros(3), None)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_row(i: int) -> dict[str, str]:
    backbone, guidance, scale = SWEEP[i]
    m = fake_metrics(i)
    return {"run": f"{i}-{guidance}", "backbone": backbone, "guidance": guidance, "classifier": "", "sampler": "",
            "scale": "" if scale is None else str(scale), "num_samples": "12", "complete": "", "nonfinite": "0",
            **{k: str(m[k]) for k in ("fid", "is", "precision", "recall", "kid", "accuracy")}, "steps": "",
            "nfe": "", "classifier_nfe": "", "sampling_seconds": "", "samples_per_second": ""}


def test_report_over_a_multirun_folder(sweep, capsys):
    assert find_runs(sweep) == sorted(sweep / f"{i}-{g}" for i, (_, g, _) in enumerate(SWEEP))
    rows = report(root=sweep)
    order = [1, 3, 0, 2, 4, 5]  # sorted by (backbone, guidance, scale)
    assert read_csv(sweep / "summary.csv") == [expected_row(i) for i in order]
    assert list(read_csv(sweep / "summary.csv")[0]) == list(COLUMNS)
    assert [r["run"] for r in rows] == [expected_row(i)["run"] for i in order]
    for i, (_, guidance, _) in enumerate(SWEEP):
        run = sweep / f"{i}-{guidance}"
        assert read_csv(run / "summary.csv") == [expected_row(i)]
        assert Image.open(run / "grid.png").size == (4 * 32, 3 * 32)
    assert not (sweep / "not-evaluated" / "summary.csv").exists()
    with Image.open(sweep / "tradeoff.png") as im:
        assert im.size == (1440, 720)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == list(COLUMNS) and len(table) == 1 + len(SWEEP)
    assert table[-1].split()[:3] == ["5-none", "digits", "none"]


def test_tradeoff_figure_has_one_curve_per_guidance_over_scales(sweep):
    rows = [summarize(sweep / f"{i}-{g}") for i, (_, g, _) in enumerate(SWEEP)]
    fid_is, pr = tradeoff_figure(rows).axes
    for ax, (x, y) in ((fid_is, ("is", "fid")), (pr, ("recall", "precision"))):
        curves = {line.get_label(): line for line in ax.lines}
        assert sorted(curves) == ["digits / cfg", "digits / classifier", "digits / none"]
        for guidance, label in (("cfg", "digits / cfg"), ("classifier", "digits / classifier")):
            idx = sorted((i for i, s in enumerate(SWEEP) if s[1] == guidance), key=lambda i: SWEEP[i][2])
            np.testing.assert_allclose(curves[label].get_xdata(), [fake_metrics(i)[x] for i in idx])
            np.testing.assert_allclose(curves[label].get_ydata(), [fake_metrics(i)[y] for i in idx])
        annotations = sorted(t.get_text() for t in ax.texts)
        assert annotations == sorted(["1", "2", "3", "0.5", "4"])  # the unguided run has no scale
    assert (fid_is.get_xlabel(), fid_is.get_ylabel()) == ("Inception score", "FID")
    assert (pr.get_xlabel(), pr.get_ylabel()) == ("recall", "precision")


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_grid_matches_upscaled_samples(tmp_path, channels):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (13, 8, 8, channels), dtype=np.uint8)
    labels = rng.integers(0, 4, 13)
    run = make_run(tmp_path / "run", {"backbone": "b"}, images, labels, {"fid": 1.0}, shard_size=4)
    for order, perm in (("index", np.arange(12)), ("label", np.argsort(labels[:12], kind="stable"))):
        grid = sample_grid(run, num=12, order=order)
        assert grid.shape == (3 * 32, 4 * 32, channels)
        for cell, i in enumerate(perm):
            r, c = divmod(cell, 4)
            expected = np.kron(images[i], np.ones((4, 4, 1), np.uint8))
            np.testing.assert_array_equal(grid[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32], expected)
    assert sample_grid(run, num=100).shape == (4 * 32, 4 * 32, channels)  # all 13: 4 columns, 4 rows
    report([run], out_dir=tmp_path / "out", grid_size=12, grid_order="index")
    saved = np.asarray(Image.open(run / "grid.png"))
    np.testing.assert_array_equal(saved.reshape(grid.shape), sample_grid(run, num=12, order="index"))


def test_missing_inputs_are_named(tmp_path, sweep):
    with pytest.raises(FileNotFoundError, match="no metrics.json under"):
        report(root=tmp_path / "empty-does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"not-evaluated/metrics\.json.*guidebench-evaluate"):
        report([sweep / "not-evaluated"], out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="report.runs"):
        report()


def test_cli_reports_a_root(sweep, tmp_path, monkeypatch):
    from guidebench.cli.report import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["guidebench-report", f"report.root={sweep}", "report.grid=false",
                                      f"hydra.run.dir={tmp_path / 'hydra'}"])
    main()
    assert len(read_csv(sweep / "summary.csv")) == len(SWEEP) and (sweep / "tradeoff.png").is_file()
    assert not (sweep / "0-cfg" / "grid.png").exists()
    runs = f"[{sweep / '0-cfg'},{sweep / '2-classifier'}]"
    monkeypatch.setattr(sys, "argv", ["guidebench-report", f"report.runs={runs}", f"hydra.run.dir={tmp_path / 'h2'}"])
    main()
    assert [r["run"] for r in read_csv(tmp_path / "h2" / "summary.csv")] == ["0-cfg", "2-classifier"]
    assert (sweep / "0-cfg" / "grid.png").is_file()


# --- steps in the summary, the plots' curves -------------------------------------------------------------------------

def test_steps_split_the_tradeoff_curves_and_fid_nfe_has_one_curve_per_method(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for i, (respacing, nfe, scale, fid) in enumerate([("ddim25", 50.0, 1.0, 8.0), ("ddim25", 50.0, 2.0, 6.0),
                                                      ("ddim10", 20.0, 2.0, 9.0), ("ddim10", 20.0, 1.0, 12.0),
                                                      ("ddim50", 100.0, 2.0, 5.0)]):
        fingerprint = {"backbone": "digits", "guidance": "cfg", "sampler": "ddim", "scale": scale,
                       "config": {"sampler": {"schedule": {"respacing": respacing}}}}
        run = make_run(tmp_path / f"r{i}", fingerprint, rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8),
                       np.zeros(4), {"fid": fid, "is": 10.0 - fid, "num_samples": 4}, cost={"nfe": nfe})
        rows.append(summarize(run))
    assert [r["steps"] for r in rows] == [25, 25, 10, 10, 50]
    fid_is, _ = tradeoff_figure(rows).axes
    curves = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in fid_is.lines}
    assert curves == {"digits / cfg / ddim / 10 steps": [(-2.0, 12.0), (1.0, 9.0)],  # over the scale, 1 then 2
                      "digits / cfg / ddim / 25 steps": [(2.0, 8.0), (4.0, 6.0)],
                      "digits / cfg / ddim / 50 steps": [(5.0, 5.0)]}
    (ax,) = nfe_figure(rows).axes
    assert [line.get_label() for line in ax.lines] == ["digits / cfg / ddim"]  # one method: every run a marker
    assert sorted(zip(ax.lines[0].get_xdata(), ax.lines[0].get_ydata())) == \
        [(20.0, 9.0), (20.0, 12.0), (50.0, 6.0), (50.0, 8.0), (100.0, 5.0)]
    (curve,) = ax.collections  # its curve: the best FID at each NFE
    np.testing.assert_allclose(curve.get_segments()[0], [(20.0, 9.0), (50.0, 6.0), (100.0, 5.0)])
    assert curve.get_colors()[0][:3] == pytest.approx(ax.lines[0].get_color()[:3])
    # several settings at one cost each (test_wandb's case): markers only, no curve
    single = [{"backbone": "digits", "guidance": "cfg", "classifier": None, "sampler": "ddim", "scale": s, "nfe": 50.0,
               "fid": f} for s, f in ((1.0, 5.0), (2.0, 3.0))]
    assert not nfe_figure(single).axes[0].collections


# --- ours vs the paper -----------------------------------------------------------------------------------------------

EDDPM_EVALUATOR = "ADM TF evaluator (guided-diffusion evaluations/evaluator.py), VIRTUAL_imagenet256_labeled.npz"


def paper_run(run: Path, *, metrics: dict, paper: dict | None, respacing: str = "250", nfe: float = 250.0,
              experiment: str | None = "x", hydra_dir: bool = True, overrides: list[str] | None = None) -> Path:
    """A sampled and evaluated run folder as guidebench-run leaves it: run.json (4 samples in one shard),
    metrics.json, and (hydra_dir) .hydra/config.yaml with the paper block and .hydra/hydra.yaml."""
    import yaml

    fingerprint = {"backbone": "adm_256", "guidance": "classifier", "sampler": "ddpm", "scale": 1.0,
                   "config": {"sampler": {"schedule": {"respacing": respacing}}}}
    make_run(run, fingerprint, np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4), metrics, cost={"nfe": nfe},
             overrides=overrides)
    if hydra_dir:
        (run / ".hydra").mkdir()
        config = {"sampler": {"schedule": {"respacing": respacing}}, "metrics": {"name": metrics.get("suite")},
                  "sampling": {"num_samples": metrics["num_samples"]}, **({"paper": paper} if paper else {})}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {
            "experiment": experiment, "backbone": "adm_256"}}}}))
    return run


@pytest.fixture
def paper_runs(tmp_path):
    root = tmp_path / "runs"
    # as published: the ADM evaluator, its reference batch, 50,000 samples, 250 steps and NFE
    paper_run(root / "0-eds", experiment="eddpm_cadm_g_eds",
              metrics={"suite": "adm", "num_samples": 50000, "reference": "/refs/VIRTUAL_imagenet256_labeled.npz",
                       "fid": 4.01, "sfid": 5.0, "is": 200.5, "precision": 0.8, "recall": 0.55},
              paper={"source": "ED-DPM README", "evaluator": EDDPM_EVALUATOR, "nfe": 250, "fid": 3.96, "sfid": 5.06,
                     "is": 219.13, "precision": 0.83, "recall": 0.52})
    # 1,000 samples scored by the ADM suite against its 64x64 batch; the paper: pytorch-fid on EDM's statistics
    paper_run(root / "1-elucd", experiment="elucd_edm64_10", respacing="ddim10", nfe=19.0,
              metrics={"suite": "adm", "num_samples": 1000, "reference": "/refs/VIRTUAL_imagenet64_labeled.npz",
                       "fid": 5.5, "sfid": 7.0},
              paper={"evaluator": "pytorch-fid (EluCD's evaluation_image.sh), EDM's imagenet-64x64.npz statistics",
                     "nfe": 19, "fid": 3.38})
    # the fast suite (= ADM's evaluator) on the 10,000 the paper names; other steps and NFE; fd_dinov2 only
    paper_run(root / "2-steps", respacing="ddim25", nfe=50.0,
              metrics={"suite": "fast", "num_samples": 10000, "reference": "/refs/VIRTUAL_imagenet256_labeled.npz",
                       "fid": 9.0, "fid_dinov2": 100.0},
              paper={"evaluator": "ADM TF evaluator (riiid/PPAP evaluator.py); the README samples 10,000 images",
                     "reference": "VIRTUAL_imagenet256_labeled.npz", "nfe": 25, "steps": 50, "fid": None,
                     "fd_dinov2": 90.5, "released_checkpoint": "x.pt"})
    # no paper block: skipped
    paper_run(root / "3-nopaper", paper=None, metrics={"suite": "adm", "num_samples": 50000, "fid": 3.0})
    return root


@pytest.mark.parametrize("text, family", [
    ("ADM TF evaluator (guided-diffusion evaluations/evaluator.py)", "adm"), ("adm", "adm"),
    ("pytorch-fid (EluCD's pytorch-fid-master/src/evaluation_image.sh)", "pytorch_fid"), ("pytorch_fid", "pytorch_fid"),
    ("EDM's fid.py (Inception-v3 FID, 50,000 images)", "edm"), ("EDM2 calculate_metrics.py", "edm2"),
    ("torch-fidelity", "torch_fidelity"), ("digits evaluation network", "digits"), (None, None),
    ("FID following Heusel et al.;\n  the code is not named", "FID following Heusel et al.; the code is not named")])
def test_paper_evaluator_families(text, family):
    assert paper_evaluator(text) == family


def test_compare_paper_rows_diffs_and_flags(paper_runs):
    rows = {row["run"]: row for row in compare_paper(root=paper_runs)}
    assert sorted(rows) == ["0-eds", "1-elucd", "2-steps"]
    eds, elucd, steps = rows["0-eds"], rows["1-elucd"], rows["2-steps"]
    assert eds["experiment"] == "eddpm_cadm_g_eds" and elucd["experiment"] == "elucd_edm64_10"
    assert {k: eds[f"diff_{k}"] for k in ("fid", "sfid", "is", "precision", "recall")} == \
        {"fid": 0.05, "sfid": -0.06, "is": -18.63, "precision": -0.03, "recall": 0.03}
    assert (eds["paper_fid"], eds["fid"], eds["diff_fd_dinov2"]) == (3.96, 4.01, None)
    assert (eds["num_samples"], eds["paper_num_samples"], eds["nfe"], eds["paper_nfe"], eds["steps"]) == \
        (50000, 50000, 250.0, 250, 250)
    assert (eds["evaluator"], eds["paper_evaluator"]) == ("adm", "adm")
    assert eds["reference"] == eds["paper_reference"] == "VIRTUAL_imagenet256_labeled.npz"
    assert eds["flags"] == "" and eds["source"] == "ED-DPM README"

    assert elucd["flags"] == "evaluator, reference, num_samples"
    assert (elucd["evaluator"], elucd["paper_evaluator"]) == ("adm", "pytorch_fid")
    assert (elucd["reference"], elucd["paper_reference"]) == ("VIRTUAL_imagenet64_labeled.npz", "imagenet-64x64.npz")
    assert (elucd["diff_fid"], elucd["paper_sfid"], elucd["diff_sfid"], elucd["sfid"]) == (2.12, None, None, 7.0)

    assert steps["flags"] == "steps, nfe"  # fast is the ADM evaluator; the paper's 10,000 samples match ours
    assert (steps["paper_num_samples"], steps["steps"], steps["paper_steps"]) == (10000, 25, 50)
    assert (steps["fd_dinov2"], steps["diff_fd_dinov2"], steps["paper_fid"], steps["diff_fid"]) == \
        (100.0, 9.5, None, None)


def test_paper_report_writes_markdown_and_csv(paper_runs, capsys):
    rows = paper_report(root=paper_runs)
    out = capsys.readouterr().out
    md = (paper_runs / "paper_comparison.md").read_text()
    assert out.startswith(md.strip()) and out.strip().endswith("(1 of 4 runs have no paper block)")
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    header, cells = table[0], {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    # a metric's column where some paper has a number for it: ours / paper (as published) / ours - paper
    assert header == ["run", "experiment", "fid", "sfid", "is", "precision", "recall", "fd_dinov2", "num_samples",
                      "nfe", "steps", "evaluator", "reference", "flags"]
    assert sorted(cells) == ["0-eds", "1-elucd", "2-steps"]
    assert cells["0-eds"] == {
        "run": "0-eds", "experiment": "eddpm_cadm_g_eds", "fid": "4.01 / 3.96 / +0.05", "sfid": "5 / 5.06 / -0.06",
        "is": "200.5 / 219.13 / -18.63", "precision": "0.8 / 0.83 / -0.03", "recall": "0.55 / 0.52 / +0.03",
        "fd_dinov2": "- / - / -", "num_samples": "50000 / 50000", "nfe": "250 / 250", "steps": "250 / -",
        "evaluator": "adm / adm", "flags": "",
        "reference": "VIRTUAL_imagenet256_labeled.npz / VIRTUAL_imagenet256_labeled.npz"}
    elucd = cells["1-elucd"]  # flagged pairs in bold
    assert (elucd["fid"], elucd["sfid"], elucd["num_samples"], elucd["evaluator"], elucd["nfe"], elucd["flags"]) == \
        ("5.5 / 3.38 / +2.12", "7 / - / -", "**1000 / 50000**", "**adm / pytorch_fid**", "19 / 19",
         "evaluator, reference, num_samples")
    assert elucd["reference"] == "**VIRTUAL_imagenet64_labeled.npz / imagenet-64x64.npz**"
    steps = cells["2-steps"]
    assert (steps["fid"], steps["fd_dinov2"], steps["nfe"], steps["steps"], steps["evaluator"], steps["flags"]) == \
        ("9 / - / -", "100 / 90.5 / +9.5", "**50 / 25**", "**25 / 50**", "fast / adm", "steps, nfe")
    assert "- 0-eds: ED-DPM README" in md

    csv_rows = {r["run"]: r for r in read_csv(paper_runs / "paper_comparison.csv")}
    columns, data = paper_table(rows)
    assert list(next(iter(csv_rows.values()))) == columns and columns[-1] == "source" and len(data) == 3
    assert csv_rows["1-elucd"]["flags"] == "evaluator, reference, num_samples"
    assert (csv_rows["0-eds"]["diff_recall"], csv_rows["0-eds"]["paper_is"], csv_rows["2-steps"]["paper_fid"]) == \
        ("0.03", "219.13", "")
    assert data[0][columns.index("diff_fid")] == 0.05 and data[2][columns.index("paper_fid")] is None


def test_paper_block_composed_from_run_json_overrides(tmp_path):
    """A run sampled into sampling.out_dir (the SLURM path) has no .hydra folder: its experiment= override
    composes the paper block again."""
    run = paper_run(tmp_path / "slurm", hydra_dir=False, respacing="ddim25", nfe=25.0, paper=None,
                    overrides=["experiment=eddpm_cadm25_g", "sampling.batch_size=8"],
                    metrics={"suite": "adm", "num_samples": 50000, "fid": 5.0,
                             "reference": "/r/VIRTUAL_imagenet256_labeled.npz"})
    (row,) = compare_paper([run])
    assert (row["experiment"], row["paper_fid"], row["diff_fid"], row["paper_nfe"], row["steps"]) == \
        ("eddpm_cadm25_g", 5.47, -0.47, 25, 25)
    assert row["paper_evaluator"] == "adm" and row["flags"] == ""
    bad = paper_run(tmp_path / "bad", hydra_dir=False, paper=None, overrides=["no_such_group=1"],
                    metrics={"suite": "adm", "num_samples": 1, "fid": 1.0})
    with pytest.warns(UserWarning, match="do not compose"):
        assert compare_paper([bad]) == []


def test_no_paper_block_says_so(sweep, capsys):
    assert paper_report(root=sweep) == []
    out = capsys.readouterr().out
    assert out.startswith("No evaluated run has a `paper:` block") and out == \
        (sweep / "paper_comparison.md").read_text()
    assert (sweep / "paper_comparison.csv").read_text().strip().split(",")[:2] == ["run", "experiment"]


def test_cli_compare_paper_flag(paper_runs, tmp_path, monkeypatch, capsys):
    from guidebench.cli.report import main

    monkeypatch.setattr(sys, "argv", ["guidebench-report", f"report.root={paper_runs}", "report.grid=false",
                                      "--compare-paper", f"hydra.run.dir={tmp_path / 'hydra'}"])
    main()
    assert "| 1-elucd | elucd_edm64_10 |" in capsys.readouterr().out
    assert len(read_csv(paper_runs / "paper_comparison.csv")) == 3 and len(read_csv(paper_runs / "summary.csv")) == 4
    (paper_runs / "paper_comparison.csv").unlink()
    monkeypatch.setattr(sys, "argv", ["guidebench-report", f"report.root={paper_runs}", "report.grid=false",
                                      f"hydra.run.dir={tmp_path / 'h2'}"])
    main()
    assert not (paper_runs / "paper_comparison.csv").exists()  # off by default


def test_compare_paper_on_a_real_digits_run(tmp_path, monkeypatch, capsys):
    """guidebench-run on the shipped digits models with a paper block given on the command line, then
    guidebench-report --compare-paper (about 20 s on 2 cores)."""
    import os
    import subprocess

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "guidebench-run"), "experiment=demo", "guidance=cfg",
                           "guidance.scale=2", "sampling.num_samples=32", "sampler.schedule.respacing=ddim5",
                           "+paper.fid=50.0", "+paper.evaluator=digits evaluation network", "+paper.nfe=10",
                           "+paper.steps=5", "+paper.reference=digits-heldout", f"hydra.run.dir={run}",
                           f"evaluation.cache_dir={tmp_path / 'cache'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from guidebench.cli.report import main

    monkeypatch.setattr(sys, "argv", ["guidebench-report", f"report.runs=[{run}]", f"report.out_dir={tmp_path / 'r'}",
                                      "report.grid=false", "--compare-paper", f"hydra.run.dir={tmp_path / 'h'}"])
    main()
    metrics = json.loads((run / "metrics.json").read_text())
    (row,) = read_csv(tmp_path / "r" / "paper_comparison.csv")
    assert row["experiment"] == "demo" and float(row["fid"]) == pytest.approx(metrics["fid"])
    assert float(row["diff_fid"]) == pytest.approx(metrics["fid"] - 50.0)
    assert (row["num_samples"], row["paper_num_samples"], row["nfe"], row["paper_nfe"], row["steps"]) == \
        ("32", "50000", "10.0", "10", "5")
    assert (row["evaluator"], row["paper_evaluator"], row["reference"]) == ("digits", "digits", "digits-heldout.npz")
    assert row["flags"] == "num_samples"
    assert f"| run | demo | {metrics['fid']:.4g} / 50 / {metrics['fid'] - 50:+.4g} | " in \
        (tmp_path / "r" / "paper_comparison.md").read_text()
