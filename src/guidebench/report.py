"""Reports over evaluated runs: summary tables, sample grids and the guidance trade-off plot.

Per run folder (RUN/run.json from sampling, RUN/metrics.json from guidebench-evaluate):
    RUN/summary.csv   one row: the run's configuration and metrics (COLUMNS): num_samples scored, complete
                      (whether they are the run's whole requested set; empty for a foreign npz or image
                      folder), nonfinite (samples dropped as NaN/inf), and the sampling cost from run.json:
                      nfe and classifier_nfe per sample, sampling_seconds, samples_per_second
    RUN/grid.png      its first samples, nearest-neighbour upscaled
Over all runs, in the report's output folder:
    summary.csv       one row per run (also printed)
    tradeoff.png      FID vs IS and precision vs recall, one curve per method (backbone, guidance, classifier,
                      sampler) and step count over its scales, as in the guidance-strength sweeps of Dhariwal &
                      Nichol 2021 and Ho & Salimans 2022
    fid_nfe.png       FID vs NFE per sample, one curve per method: every run as a point, the curve through the
                      method's best FID at each NFE (over its scales): quality against sampling cost
    paper_comparison.md, paper_comparison.csv (report.compare_paper=true)
                      ours vs the published numbers of every run whose config has a `paper:` block, with the
                      sample count, NFE, steps, evaluator and reference of each and flags where they differ
                      (guidebench.paper_comparison; docs/report.md)
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import matplotlib
from matplotlib.figure import Figure
from PIL import Image

from guidebench.evaluation.sources import ShardSource

COLUMNS = ("run", "backbone", "guidance", "classifier", "sampler", "scale", "num_samples", "complete", "nonfinite",
           "fid", "is", "precision", "recall", "kid", "accuracy", "steps", "nfe", "classifier_nfe", "sampling_seconds",
           "samples_per_second")
CURVE = ("backbone", "guidance", "classifier", "sampler")  # a method: one FID-NFE curve per setting of these
TRADEOFF_CURVE = (*CURVE, "steps")  # one trade-off curve per method and step count, over the scale
METRICS = ("fid", "is", "precision", "recall", "kid", "accuracy")
COST = ("nfe", "classifier_nfe", "sampling_seconds", "samples_per_second")  # from run.json


def find_runs(root: str | Path) -> list[Path]:
    """Every folder under `root` (itself included) holding a metrics.json, e.g. the jobs of a Hydra multirun."""
    runs = sorted(p.parent for p in Path(root).rglob("metrics.json"))
    if not runs:
        raise FileNotFoundError(f"no metrics.json under {root}; evaluate the runs first (guidebench-evaluate)")
    return runs


def schedule_steps(schedule: Any) -> int | None:
    """Solver steps of a sampler.schedule config (guidebench.loggers.num_steps); None if it names none."""
    from omegaconf import DictConfig, OmegaConf

    from guidebench.loggers import num_steps

    try:
        return num_steps(schedule if isinstance(schedule, DictConfig) else OmegaConf.create(schedule))
    except Exception:  # no schedule (a foreign npz), or one without num_steps / respacing
        return None


def summarize(run: str | Path, name: str | None = None) -> dict[str, Any]:
    """The summary row of one run: run.json's fingerprint and cost (if any) and metrics.json's numbers;
    steps: the solver steps of the fingerprint's sampler.schedule."""
    run = Path(run)
    if not (run / "metrics.json").is_file():
        raise FileNotFoundError(f"{run / 'metrics.json'} not found; evaluate it first: "
                                f"guidebench-evaluate evaluation.samples={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    fingerprint = manifest.get("fingerprint", {})
    return {"run": name or run.name, "backbone": fingerprint.get("backbone"), "guidance": fingerprint.get("guidance"),
            "classifier": fingerprint.get("classifier"), "sampler": fingerprint.get("sampler"),
            "scale": fingerprint.get("scale"), "num_samples": metrics.get("num_samples", fingerprint.get("num_samples")),
            "complete": metrics.get("complete"), "nonfinite": metrics.get("nonfinite"),
            **{k: metrics.get(k) for k in METRICS},
            "steps": schedule_steps(((fingerprint.get("config") or {}).get("sampler") or {}).get("schedule")),
            **{k: manifest.get(k) for k in COST}}


def write_csv(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if row[k] is None else row[k] for k in COLUMNS} for row in rows)
    return path


def sample_grid(run: str | Path, num: int = 100, order: str = "label", min_cell: int = 32) -> np.ndarray:
    """The first `num` samples of a run's shards as one uint8 [rows*H*s, cols*W*s, C] image.

    order: 'label' (stable-sorted by class label) or 'index'. Each image is upscaled by the nearest-neighbour
    factor s = ceil(min_cell / max(H, W)), so 8x8 digits become 32x32 cells. ceil(sqrt(n)) columns.
    """
    if order not in ("label", "index"):
        raise ValueError(f"grid order must be 'label' or 'index', got {order!r}")
    source = ShardSource(run)
    n = min(num, len(source))
    images = np.stack([source[i].numpy().transpose(1, 2, 0) for i in range(n)])
    if order == "label":
        images = images[np.argsort(source.labels[:n], kind="stable")]
    cols = math.ceil(math.sqrt(n))
    rows, (h, w, c) = math.ceil(n / cols), images.shape[1:]
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        grid[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = image
    s = max(1, math.ceil(min_cell / max(h, w)))
    return grid.repeat(s, axis=0).repeat(s, axis=1)


def write_grid(run: str | Path, path: str | Path, num: int = 100, order: str = "label") -> Path:
    grid = sample_grid(run, num, order)
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(path)
    return Path(path)


def _scale_key(row: dict[str, Any]) -> tuple:
    scale = row["scale"]
    return (isinstance(scale, (int, float)), scale if isinstance(scale, (int, float)) else str(scale))


def _label(key: tuple, keys: tuple[str, ...]) -> str:
    return " / ".join(f"{v} steps" if k == "steps" else str(v) for k, v in zip(keys, key) if v is not None)


def _curves(rows: list[dict[str, Any]], keys: tuple[str, ...] = CURVE) -> list[tuple[str, dict, list[dict[str, Any]]]]:
    """(label, line style, rows sorted by scale) per setting of `keys`, in a fixed order and colours."""
    curves = defaultdict(list)
    for row in rows:
        curves[tuple(row.get(k) for k in keys)].append(row)
    colors, markers = matplotlib.colormaps["tab20"].colors, "os^Dv"
    return [(_label(key, keys),
             dict(color=colors[(2 * n) % 20 + (n // 10) % 2], marker=markers[n % len(markers)]),
             sorted(members, key=_scale_key))
            for n, (key, members) in enumerate(sorted(curves.items(), key=lambda kv: tuple(map(str, kv[0]))))]


def _annotate(ax, points) -> None:
    for px, py, scale in points:
        if scale is not None:
            ax.annotate(f"{scale:g}" if isinstance(scale, (int, float)) else str(scale), (px, py),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)


def tradeoff_figure(rows: list[dict[str, Any]]) -> Figure:
    """Two panels, FID vs IS and precision vs recall; one curve per method and step count (TRADEOFF_CURVE) over
    its scales, points labelled by scale. Runs of one method at other step counts are other curves: a curve
    over the scale at mixed costs would zigzag between them."""
    fig = Figure(figsize=(12, 6))
    panels = fig.subplots(1, 2)
    for label, style, members in _curves(rows, TRADEOFF_CURVE):
        for ax, (x, y) in zip(panels, (("is", "fid"), ("recall", "precision"))):
            points = [(r[x], r[y], r["scale"]) for r in members if r[x] is not None and r[y] is not None]
            if not points:
                continue
            xs, ys, scales = zip(*points)
            ax.plot(xs, ys, label=label, **style)
            _annotate(ax, points)
    panels[0].set(xlabel="Inception score", ylabel="FID", title="FID vs IS")
    panels[1].set(xlabel="recall", ylabel="precision", title="precision vs recall")
    for ax in panels:
        ax.grid(alpha=0.3)
    if panels[0].lines or panels[1].lines:
        handles, labels = (panels[0] if panels[0].lines else panels[1]).get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    else:
        fig.tight_layout()
    return fig


def tradeoff_plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    tradeoff_figure(rows).savefig(path, dpi=120)
    return Path(path)


def nfe_figure(rows: list[dict[str, Any]]) -> Figure:
    """FID vs NFE per sample (the quality a method buys with network evaluations, each batched CFG forward and
    each backward counted, see run.json), one curve per method (CURVE; its step counts give its NFEs): every
    run a marker (one Line2D per method, points labelled by scale) and the method's curve through its best
    FID at each NFE, the lower envelope over its scales (a LineCollection in the method's colour). NFE on a
    log axis when the runs span more than a factor of 20."""
    from matplotlib.collections import LineCollection

    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    for label, style, members in _curves(rows):
        points = sorted(((r["nfe"], r["fid"], r["scale"]) for r in members
                         if r.get("nfe") is not None and r.get("fid") is not None), key=lambda p: p[:2])
        if points:
            nfes, fids, _ = zip(*points)
            ax.plot(nfes, fids, label=label, linestyle="none", **style)
            _annotate(ax, points)
            best = [min(p[:2] for p in points if p[0] == nfe) for nfe in sorted(set(nfes))]
            if len(best) > 1:
                ax.add_collection(LineCollection([best], colors=[style["color"]], label=f"_{label} (best FID per NFE)"))
    nfes = [x for line in ax.lines for x in line.get_xdata()]
    if nfes and min(nfes) > 0 and max(nfes) / min(nfes) > 20:
        ax.set_xscale("log")
    ax.set(xlabel="NFE per sample", ylabel="FID", title="FID vs NFE")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def nfe_plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    nfe_figure(rows).savefig(path, dpi=120)
    return Path(path)


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [list(COLUMNS)] + [[cell(row[k]) for k in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells)


def write_run_report(run: str | Path, name: str | None = None, *, grid: bool = True, grid_size: int = 100,
                     grid_order: str = "label") -> dict[str, Any]:
    """One run's summary.csv and (from its shards) grid.png; returns the summary row."""
    run = Path(run)
    row = summarize(run, name)
    write_csv([row], run / "summary.csv")
    if grid and (run / "shards").is_dir():
        write_grid(run, run / "grid.png", grid_size, grid_order)
    return row


def report(runs: Iterable[str | Path] = (), root: str | Path | None = None, out_dir: str | Path | None = None, *,
           grid: bool = True, grid_size: int = 100, grid_order: str = "label") -> list[dict[str, Any]]:
    """Summaries of `runs` (or of every run under `root`): each run's summary.csv and grid.png, then the
    table (printed, out_dir/summary.csv) and out_dir/tradeoff.png. out_dir defaults to `root`."""
    runs = [Path(r) for r in runs] or (find_runs(root) if root is not None else [])
    if not runs:
        raise ValueError("nothing to report: set report.runs=[DIR,...] or report.root=DIR")
    out_dir = Path(out_dir if out_dir is not None else root if root is not None else ".")
    rows = []
    for run in runs:
        name = str(run.relative_to(root)) if root is not None and run != Path(root) else run.name
        rows.append(write_run_report(run, name, grid=grid, grid_size=grid_size, grid_order=grid_order))
    rows.sort(key=lambda r: (*(str(r[k]) for k in CURVE), r["steps"] is not None, r["steps"] or 0, _scale_key(r),
                             r["run"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "summary.csv")
    tradeoff_plot(rows, out_dir / "tradeoff.png")
    nfe_plot(rows, out_dir / "fid_nfe.png")
    print(format_table(rows))
    if root is not None and (Path(root) / "optimization_results.yaml").is_file():
        best = search_result(root)
        (out_dir / "search.txt").write_text(best + "\n")
        print(best)
    return rows


def search_result(root: str | Path) -> str:
    """The best point of a Hydra Optuna search over `root` (its optimization_results.yaml), as one line that
    names the trial (its run folder) and the objective (guidebench-run returns FID)."""
    from omegaconf import OmegaConf

    result = OmegaConf.load(Path(root) / "optimization_results.yaml")
    params = OmegaConf.to_container(result.best_params)
    trials = {}
    for run in find_runs(root):
        overrides = json.loads((run / "run.json").read_text()).get("overrides", []) if (run / "run.json").is_file() else []
        trials[run.name] = dict(o.split("=", 1) for o in overrides if "=" in o)
    match = [name for name, o in trials.items() if all(o.get(k) == str(v) for k, v in params.items())]
    where = f" (trial {match[0]})" if match else ""
    setting = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"best of {len(trials)} trials: {setting} -> FID {float(result.best_value):.4g}{where}"
