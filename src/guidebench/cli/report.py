"""guidebench-report: table, sample grids and trade-off plots over evaluated runs (logger=wandb: a summary run)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from guidebench.config import CONF_DIR
from guidebench.loggers import build_loggers
from guidebench.report import report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="report")
def main(cfg: DictConfig) -> None:
    r = cfg.report
    out_dir = Path(r.out_dir or r.root or cfg.paths.output_dir)
    rows = report(r.runs, r.root, out_dir, grid=r.grid, grid_size=r.grid_size, grid_order=r.grid_order)
    for logger in build_loggers(cfg.get("logger")):
        logger.log_report(cfg, out_dir, rows, Path(r.root).name if r.root else None,
                          {name: out_dir / f"{name}.png" for name in ("tradeoff", "fid_nfe")})


if __name__ == "__main__":
    main()
