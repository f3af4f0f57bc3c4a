"""guidebench-report: table, sample grids and trade-off plot over evaluated runs."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from guidebench.config import CONF_DIR
from guidebench.report import report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="report")
def main(cfg: DictConfig) -> None:
    r = cfg.report
    report(r.runs, r.root, r.out_dir or r.root or cfg.paths.output_dir, grid=r.grid, grid_size=r.grid_size,
           grid_order=r.grid_order)


if __name__ == "__main__":
    main()
