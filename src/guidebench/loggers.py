"""Experiment loggers. W&B runs offline here (no server): `wandb sync <dir>` uploads them later."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf


class WandbLogger:
    """Logs a run's config, metrics and sample grid to one W&B run (mode offline by default)."""

    def __init__(self, project: str = "guidebench", mode: str = "offline", dir: str | None = None,
                 entity: str | None = None):
        self.project, self.mode, self.dir, self.entity = project, mode, dir, entity

    def log_run(self, cfg: DictConfig, name: str, metrics: dict[str, Any], images: list[Path]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        Path(self.dir or ".").mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, dir=self.dir, name=name,
                         config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
        run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))} |
                {p.stem: wandb.Image(str(p)) for p in images if p.exists()})
        run.finish()


def build_loggers(cfg: DictConfig | None) -> list:
    """Every entry of the logger group that has a `_target_` (several loggers may be combined)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry]
