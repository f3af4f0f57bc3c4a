"""guidebench-report: per-run summaries and grids, the table over a multirun folder, the trade-off plot."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guidebench.report import COLUMNS, find_runs, report, sample_grid, summarize, tradeoff_figure
from guidebench.shards import ShardWriter

# (backbone, guidance, scale) of the fake sweep; metrics are made up from the index
SWEEP = [("digits", "cfg", 3.0), ("digits", "cfg", 1.0), ("digits", "classifier", 0.5), ("digits", "cfg", 2.0),
         ("digits", "classifier", 4.0), ("digits", "none", None)]


def make_run(run: Path, fingerprint: dict, images: np.ndarray, labels: np.ndarray, metrics: dict | None,
             shard_size: int = 5) -> Path:
    writer = ShardWriter(run, fingerprint, num_samples=len(images), shard_size=shard_size).prepare()
    for k, start in enumerate(range(0, len(images), shard_size)):
        idx = np.arange(start, min(start + shard_size, len(images)))
        writer.write(k, images[idx], labels[idx], idx, idx)
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
            **{k: str(m[k]) for k in ("fid", "is", "precision", "recall", "kid", "accuracy")},
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
