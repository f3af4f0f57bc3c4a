"""Experiment loggers. W&B runs offline here (no server): `wandb sync <dir>/wandb/offline-run-*` uploads them later.

One W&B run per setting (guidebench-run, job_type "run": it samples and scores in one process), grouped by the
sweep, and one summary run per report (guidebench-report, job_type "report") holding the table of all settings
and the trade-off plots, so settings compare in W&B with no manual wiring.
"""

from __future__ import annotations

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


def filter_keys(cfg: DictConfig) -> dict[str, Any]:
    """The flat keys users filter runs on (FILTER_KEYS), as sampling records them in run.json's fingerprint."""
    from guidebench.sampling import fingerprint

    return {k: v for k, v in fingerprint(cfg).items() if k in FILTER_KEYS} | {"steps": num_steps(cfg.sampler.schedule)}


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

    def log_run(self, cfg: DictConfig, run_dir: str | Path, row: dict[str, Any]) -> None:
        """One setting: config = filter_keys() plus the resolved config under `cfg`; summary = the run's
        summary row (metrics, complete, nonfinite, nfe, cost); `grid` = its grid.png."""
        run_dir, config = Path(run_dir), filter_keys(cfg) | {"cfg": OmegaConf.to_container(cfg, resolve=True)}
        grid = run_dir / "grid.png"
        self._log(run_dir, run_dir.name, sweep_name(), "run", config,
                  lambda wandb: {k: v for k, v in row.items() if isinstance(v, (int, float))} |
                  ({"grid": wandb.Image(str(grid))} if grid.is_file() else {}))

    def log_report(self, cfg: DictConfig, out_dir: str | Path, rows: list[dict[str, Any]], group: str | None,
                   figures: dict[str, Path]) -> None:
        """A sweep's summary run: `settings`, a wandb.Table of the summary rows (report.COLUMNS), and the figures."""
        from guidebench.report import COLUMNS

        self._log(Path(out_dir), "report", group, "report", OmegaConf.to_container(cfg, resolve=True),
                  lambda wandb: {"settings": wandb.Table(columns=list(COLUMNS), allow_mixed_types=True,
                                                         data=[[row[k] for k in COLUMNS] for row in rows])} |
                  {k: wandb.Image(str(p)) for k, p in figures.items() if p.is_file()})


def build_loggers(cfg: DictConfig | None) -> list:
    """Every entry of the logger group that has a `_target_` (several loggers may be combined)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry]
