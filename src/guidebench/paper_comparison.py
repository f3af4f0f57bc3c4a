"""Ours vs the paper: each evaluated run whose config has a `paper:` block (conf/experiment/) against the
published numbers, with the sample count, NFE, steps, evaluator and reference of each, and flags where they
differ (`guidebench-report report.compare_paper=true`: paper_comparison.md / .csv; docs/report.md)."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

from guidebench.report import find_runs, schedule_steps, summarize

PAPER_METRICS = ("fid", "sfid", "is", "precision", "recall", "fd_dinov2")  # compared where the paper has a number
PAPER_NUM_SAMPLES = 50_000  # what a paper scored unless its block says otherwise (num_samples; "N samples" in text)
# the evaluator family each guidebench suite (metrics.json "suite", conf/metrics/NAME.yaml name) reproduces
SUITE_EVALUATORS = {"adm": "adm", "fast": "adm", "edm2": "edm2", "digits": "digits", "pytorch_fid": "pytorch_fid"}
# the family a paper block's free-text `evaluator` names: the first pattern that matches (case-insensitive)
PAPER_EVALUATORS = (
    (r"pytorch[-_ ]?fid", "pytorch_fid"),                  # mseitzer/pytorch-fid
    (r"edm2|calculate_metrics\.py", "edm2"),               # EDM2's calculate_metrics.py
    (r"\bedm\b.*fid\.py|^fid\.py", "edm"),                 # EDM's fid.py (no guidebench suite)
    (r"torch[-_ ]?fidelity", "torch_fidelity"),
    (r"clean[-_ ]?fid", "clean_fid"),
    (r"\badm\b|guided[-_ ]diffusion|evaluations/evaluator\.py", "adm"),  # ADM's TF evaluator
    (r"\bdigits\b", "digits"),
)
_FILE = re.compile(r"[\w.+-]+\.(?:npz|pkl|npy|zip|tar|pt)\b")
_COUNT = re.compile(r"(\d[\d,]*)\s*(k)?\s+(?:samples|images)\b", re.IGNORECASE)  # "10,000 samples", "50k images"


def paper_evaluator(text: str | None) -> str | None:
    """The evaluator family (a SUITE_EVALUATORS value, or edm / torch_fidelity / clean_fid) a paper block's
    `evaluator` names; the text itself if no pattern matches (so it compares as different); None if null."""
    if text is None:
        return None
    for pattern, family in PAPER_EVALUATORS:
        if re.search(pattern, str(text), re.IGNORECASE):
            return family
    return " ".join(str(text).split())


def _reference_name(text: Any) -> str | None:
    """The file a paper's reference text names (the first *.npz / *.pkl / ...), else the text."""
    if text is None or str(text).strip() == "":
        return None
    found = _FILE.findall(str(text))
    return found[0] if found else " ".join(str(text).split())


def _same_reference(ours: str | None, paper: str) -> bool:
    """File names equal (case-insensitive); a name without extension (digits-heldout) matches on the stem."""
    if ours is None:
        return False
    ours, paper = ours.lower(), paper.lower()
    return ours == paper or (not Path(paper).suffix and Path(ours).stem == paper)


def _sample_count(paper: dict) -> int:
    if paper.get("num_samples") is not None:
        return int(paper["num_samples"])
    for key in ("evaluator", "reference"):
        found = _COUNT.search(str(paper.get(key) or ""))
        if found:
            return int(found[1].replace(",", "")) * (1000 if found[2] else 1)
    return PAPER_NUM_SAMPLES


def run_config(run: str | Path):
    """The composed config of a run: RUN/.hydra/config.yaml (the run folder is the Hydra output folder of
    guidebench-run / guidebench-sample), else the sample config composed again from run.json's overrides
    (sampling.out_dir set elsewhere, e.g. the SLURM path); None if neither is there or composing fails."""
    from omegaconf import OmegaConf

    run = Path(run)
    if (run / ".hydra" / "config.yaml").is_file():
        return OmegaConf.load(run / ".hydra" / "config.yaml")
    overrides = _overrides(run)
    if overrides is None:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from guidebench.config import CONF_DIR

    try:
        if GlobalHydra.instance().is_initialized():  # inside guidebench-report (its search path is CONF_DIR)
            return compose("sample", overrides=overrides)
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("sample", overrides=overrides)
    except Exception as e:  # an override the configs no longer take
        warnings.warn(f"{run}: no .hydra/config.yaml, and run.json's overrides {overrides} do not compose ({e}); "
                      "it is compared as a run without a paper block")
        return None


def _overrides(run: Path) -> list[str] | None:
    try:
        overrides = json.loads((run / "run.json").read_text()).get("overrides")
    except (OSError, ValueError, AttributeError):
        return None
    return overrides if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides) else None


def _experiment(run: Path) -> str | None:
    """The run's experiment= choice: RUN/.hydra/hydra.yaml's runtime choices, else run.json's overrides."""
    from omegaconf import OmegaConf

    if (run / ".hydra" / "hydra.yaml").is_file():
        choice = OmegaConf.select(OmegaConf.load(run / ".hydra" / "hydra.yaml"), "hydra.runtime.choices.experiment")
        if choice is not None:
            return str(choice)
    for override in _overrides(run) or ():
        key, _, value = override.partition("=")
        if key.lstrip("+") == "experiment":
            return value
    return None


def _container(node) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that needs the Hydra app (${hydra:...})
        return OmegaConf.to_container(node, resolve=False)


def _diff(ours: Any, paper: Any) -> float | None:
    if not isinstance(ours, (int, float)) or not isinstance(paper, (int, float)):
        return None
    return float(f"{ours - paper:.12g}")  # without float noise: 4.01 - 3.96 is 0.05


def _differ(ours: Any, paper: Any) -> bool:
    """Whether two known numbers differ (NFE per sample is a mean over shards: 1e-3 relative slack)."""
    return ours is not None and paper is not None and not math.isclose(float(ours), float(paper), rel_tol=1e-3)


def paper_row(run: str | Path, name: str | None = None) -> dict[str, Any] | None:
    """One run against its paper block (None if its config, run_config(), has none), a PAPER_COLUMNS row:
    <metric>, paper_<metric>, diff_<metric> (ours - paper, where both are numbers) per PAPER_METRICS;
    num_samples (scored, metrics.json) vs paper_num_samples (the block's num_samples, else "N samples" or
    "N images" in its evaluator or reference text, else 50,000); nfe (run.json, per sample) vs paper_nfe;
    steps (the sampler schedule's solver steps) vs paper_steps (the block's `steps`, if any); evaluator (the
    suite that scored it) vs paper_evaluator (paper_evaluator(): the family its text names); reference (the
    file scored against) vs paper_reference (the file the block's `reference` names, else one its evaluator
    text names); flags: what differs, of "evaluator" (families: SUITE_EVALUATORS), "reference" (file names),
    "num_samples", "steps", "nfe", joined by ", " (a null paper value is not compared); source: the block's.
    Missing keys of the block read as null."""
    run = Path(run)
    cfg = run_config(run)
    block = cfg.get("paper") if cfg is not None else None
    if block is None:
        return None
    paper = _container(block) or {}
    ours = summarize(run, name)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.setdefault("fd_dinov2", metrics.get("fid_dinov2"))  # the edm2 suite's name for FD-DINOv2
    suite = metrics.get("suite") or (cfg.get("metrics") or {}).get("name")
    steps = ours["steps"] if ours["steps"] is not None else schedule_steps((cfg.get("sampler") or {}).get("schedule"))
    evaluator, reference = paper_evaluator(paper.get("evaluator")), paper.get("reference")
    row: dict[str, Any] = {"run": ours["run"], "experiment": _experiment(run)}
    for k in PAPER_METRICS:
        row |= {k: metrics.get(k), f"paper_{k}": paper.get(k), f"diff_{k}": _diff(metrics.get(k), paper.get(k))}
    row |= {"num_samples": ours["num_samples"], "paper_num_samples": _sample_count(paper),
            "nfe": ours["nfe"], "paper_nfe": paper.get("nfe"), "steps": steps, "paper_steps": paper.get("steps"),
            "evaluator": suite, "paper_evaluator": evaluator,
            "reference": Path(metrics["reference"]).name if metrics.get("reference") else None,
            "paper_reference": _reference_name(reference) if reference is not None else
            next(iter(_FILE.findall(str(paper.get("evaluator") or ""))), None)}
    flags = []
    if evaluator is not None and SUITE_EVALUATORS.get(suite, suite) != evaluator:
        flags.append("evaluator")
    if row["paper_reference"] is not None and not _same_reference(row["reference"], row["paper_reference"]):
        flags.append("reference")
    if ours["num_samples"] != row["paper_num_samples"]:
        flags.append("num_samples")
    if _differ(steps, row["paper_steps"]):
        flags.append("steps")
    if _differ(ours["nfe"], row["paper_nfe"]):
        flags.append("nfe")
    return row | {"flags": ", ".join(flags), "source": paper.get("source")}


PAPER_COLUMNS = ("run", "experiment", *(f"{p}{k}" for k in PAPER_METRICS for p in ("", "paper_", "diff_")),
                 "num_samples", "paper_num_samples", "nfe", "paper_nfe", "steps", "paper_steps", "evaluator",
                 "paper_evaluator", "reference", "paper_reference", "flags", "source")


def paper_columns(rows: list[dict[str, Any]]) -> list[str]:
    """PAPER_COLUMNS less the metric triples no paper has a number for, and paper_steps if no paper gives steps."""
    def given(k):
        return any(row.get(f"paper_{k}") is not None for row in rows)

    return [c for c in PAPER_COLUMNS
            if not (c.removeprefix("paper_").removeprefix("diff_") in PAPER_METRICS
                    and not given(c.removeprefix("paper_").removeprefix("diff_")))
            and not (c == "paper_steps" and not given("steps"))]


def compare_paper(runs: Iterable[str | Path] = (), root: str | Path | None = None) -> list[dict[str, Any]]:
    """paper_row() of each of `runs` (or of every run under `root`, named relative to it) that has a paper
    block, in run order; runs without one are skipped."""
    runs = [Path(r) for r in runs] or (find_runs(root) if root is not None else [])
    rows = []
    for run in runs:
        name = str(run.relative_to(root)) if root is not None and run != Path(root) else run.name
        row = paper_row(run, name)
        if row is not None:
            rows.append(row)
    return rows


def paper_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, data) of compare_paper()'s rows, e.g. for wandb.Table(columns=columns, data=data,
    allow_mixed_types=True): paper_columns(rows), and per row its values (None where blank)."""
    columns = paper_columns(rows)
    return columns, [[row.get(c) for c in columns] for row in rows]


PAIRS = ("num_samples", "nfe", "steps", "evaluator", "reference")  # markdown cells ours / paper, each also a flag


def _md(value: Any, paper: bool = False, diff: bool = False, width: int | None = None) -> str:
    """A markdown cell value: ours to 4 significant digits, the paper's as published, diffs signed; text
    longer than `width` cut (the CSV has it whole)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4g}" if diff else f"{value:g}" if paper else f"{value:.4g}"
    text = " ".join(str(value).split())
    text = text if width is None or len(text) <= width else text[:width - 3].rstrip() + "..."
    return text.replace("|", "\\|")


def format_paper_markdown(rows: list[dict[str, Any]]) -> str:
    """compare_paper()'s rows as a markdown table: run, experiment, per metric some paper has a number for
    `ours / paper / diff`, then `ours / paper` of num_samples, nfe, steps, evaluator, reference (bold where
    flagged), the flags; then each run's source. '-': none."""
    if not rows:
        return ("No evaluated run has a `paper:` block: nothing to compare. Runs of an experiment with one "
                "(e.g. experiment=eddpm_cadm_g_eds) have it in their .hydra/config.yaml; add one to a run with "
                "+paper.fid=... +paper.evaluator=...")
    columns = paper_columns(rows)
    metrics = [k for k in PAPER_METRICS if k in columns]
    header = ["run", "experiment", *metrics, *PAIRS, "flags"]
    lines = ["Metrics: ours / paper / ours - paper; then ours / paper, in bold where they differ (flags).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        flags = row["flags"].split(", ")
        cells = [_md(row["run"]), _md(row["experiment"])]
        cells += [f"{_md(row[k])} / {_md(row[f'paper_{k}'], paper=True)} / {_md(row[f'diff_{k}'], diff=True)}"
                  for k in metrics]
        for name in PAIRS:
            pair = f"{_md(row[name])} / {_md(row[f'paper_{name}'], paper=True, width=40)}"
            cells.append(f"**{pair}**" if name in flags else pair)
        lines.append("| " + " | ".join(cells + [row["flags"]]) + " |")
    sources = [f"- {row['run']}: {_md(row['source'])}" for row in rows if row.get("source")]
    return "\n".join(lines + (["", "Sources:", *sources] if sources else []))


def paper_report(runs: Iterable[str | Path] = (), root: str | Path | None = None,
                 out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """compare_paper() of `runs` (or of every run under `root`), written as out_dir/paper_comparison.md and
    out_dir/paper_comparison.csv (paper_columns(); out_dir defaults to `root`), the markdown printed; returns
    the rows (paper_table() makes a W&B table of them). Without any paper block both files say so."""
    runs = [Path(r) for r in runs] or (find_runs(root) if root is not None else [])
    if not runs:
        raise ValueError("nothing to compare: set report.runs=[DIR,...] or report.root=DIR")
    rows = compare_paper(runs, root)
    out_dir = Path(out_dir if out_dir is not None else root if root is not None else ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = format_paper_markdown(rows)
    (out_dir / "paper_comparison.md").write_text(markdown + "\n")
    columns = paper_columns(rows)
    with open(out_dir / "paper_comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)
    skipped = len(runs) - len(rows)
    print(markdown + (f"\n({skipped} of {len(runs)} runs have no paper block)" if rows and skipped else ""))
    return rows
