"""Experiment loggers. W&B runs offline here (no server): `wandb sync <dir>/wandb/offline-run-*` uploads them later.

Per setting, grouped by the sweep: a `sample` run when its shards are written (guidebench-sample, or
guidebench-run's sampling) holding the cost and the sample grid, and an `evaluate` run when they are scored
(guidebench-evaluate, or guidebench-run's evaluation) holding the metrics; both carry the flat keys users filter on.
Per report (guidebench-report), one `report` run holding the table of all settings and the trade-off plots, so
settings compare in W&B with no manual wiring, however they were launched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

FILTER_KEYS = ("backbone", "guidance", "scale", "sampler", "steps", "classifier", "num_samples", "seed")


def sweep_name() -> str | None:
    """The W&B group of a Hydra job: its sweep folder's name in a multirun (-m), else the experiment's name."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else hc.runtime.choices.get("experiment")


def num_steps(schedule: DictConfig) -> int:
    """Solver steps of a schedule config: `num_steps` (Karras) or ADM's respacing ("ddim25", "250", "10,15,20")."""
    if "num_steps" in schedule:
        return int(schedule.num_steps)
    respacing = schedule.respacing
    if isinstance(respacing, str):
        return int(respacing[len("ddim"):]) if respacing.startswith("ddim") else sum(map(int, respacing.split(",")))
    return int(respacing) if isinstance(respacing, int) else sum(respacing)


def filter_keys(run_dir: str | Path) -> dict[str, Any]:
    """The flat keys users filter runs on (FILTER_KEYS), as the run's run.json fingerprint records them (none for
    samples guidebench did not make: an ADM npz, an image folder)."""
    if not (Path(run_dir) / "run.json").is_file():
        return {}
    fingerprint = json.loads((Path(run_dir) / "run.json").read_text())["fingerprint"]
    schedule = OmegaConf.create(fingerprint["config"]["sampler"]["schedule"])
    return {k: v for k, v in fingerprint.items() if k in FILTER_KEYS} | {"steps": num_steps(schedule)}


def sample_summary(run_dir: str | Path) -> dict[str, Any]:
    """What the sampling stage reports: run.json's totals (samples written, non-finite) and cost, and whether
    its shards cover the whole requested set."""
    from guidebench.report import COST

    manifest = json.loads((Path(run_dir) / "run.json").read_text())
    starts = sorted(e["start"] for e in manifest.get("shards", []))
    complete = starts == list(range(0, manifest["num_samples"], manifest["shard_size"]))
    return {"num_samples": manifest["num_samples"], "complete": complete,
            **{k: manifest.get(k) for k in ("written", "nonfinite", *COST)}}


class WandbLogger:
    """Logs to W&B, offline by default. `dir` null: the folder the caller logs about (run folder, report folder);
    `group` null: sweep_name() for a run, the report root's name for a report (the same name for a sweep)."""

    def __init__(self, project: str = "guidebench", mode: str = "offline", dir: str | None = None,
                 entity: str | None = None, group: str | None = None):
        self.project, self.mode, self.dir, self.entity, self.group = project, mode, dir, entity, group

    def _log(self, folder: Path, name: str, group: str | None, job_type: str, config: dict, data) -> None:
        """One W&B run that logs `data(wandb)` once (step 0, so also its summary), complete on disk on return."""
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        folder = Path(self.dir or folder)
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, dir=folder, name=name,
                         group=self.group or group, job_type=job_type, config=config, reinit="finish_previous")
        run.log(data(wandb))
        run.finish()
        wandb.teardown()  # the W&B service writes the run's files asynchronously; this waits for them

    def _log_stage(self, cfg: DictConfig, run_dir: str | Path, job_type: str, summary: dict[str, Any]) -> None:
        """One stage of a setting: config = filter_keys() plus the resolved config under `cfg`, summary = the
        numbers, `grid` = the first 100 samples (label order) of its shards."""
        from guidebench.report import sample_grid

        run_dir = Path(run_dir)
        config = filter_keys(run_dir) | {"cfg": OmegaConf.to_container(cfg, resolve=True)}
        grid = sample_grid(run_dir) if (run_dir / "shards").is_dir() else None
        self._log(run_dir, run_dir.name, sweep_name(), job_type, config,
                  lambda wandb: {k: v for k, v in summary.items() if isinstance(v, (int, float))} |
                  ({"grid": wandb.Image(grid)} if grid is not None else {}))

    def log_sample(self, cfg: DictConfig, run_dir: str | Path) -> None:
        """The sampling stage (job_type sample): sample_summary()."""
        self._log_stage(cfg, run_dir, "sample", sample_summary(run_dir))

    def log_evaluate(self, cfg: DictConfig, run_dir: str | Path, row: dict[str, Any]) -> None:
        """The evaluation stage (job_type evaluate): the run's summary row (metrics, complete, nonfinite, cost)."""
        self._log_stage(cfg, run_dir, "evaluate", row)

    def log_report(self, cfg: DictConfig, out_dir: str | Path, rows: list[dict[str, Any]], group: str | None,
                   figures: dict[str, Path], comparison: tuple[list[str], list[list]] | None = None) -> None:
        """A sweep's summary run: `settings`, a wandb.Table of the summary rows (report.COLUMNS), the figures, and
        `paper_comparison`, the table of ours vs the paper (paper_comparison.paper_table()) if given."""
        from guidebench.report import COLUMNS

        def data(wandb):
            logged = {"settings": wandb.Table(columns=list(COLUMNS), allow_mixed_types=True,
                                              data=[[row[k] for k in COLUMNS] for row in rows])}
            if comparison is not None:
                logged["paper_comparison"] = wandb.Table(columns=comparison[0], data=comparison[1],
                                                         allow_mixed_types=True)
            return logged | {k: wandb.Image(str(p)) for k, p in figures.items() if p.is_file()}

        self._log(Path(out_dir), "report", group, "report", OmegaConf.to_container(cfg, resolve=True), data)


def build_loggers(cfg: DictConfig | None) -> list:
    """Every entry of the logger group that has a `_target_` (several loggers may be combined)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry]
