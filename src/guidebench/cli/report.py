"""guidebench-report: table, sample grids and trade-off plots over evaluated runs (logger=wandb: a summary run);
report.compare_paper=true (or --compare-paper) adds ours vs the paper (paper_comparison.md / .csv)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from guidebench.config import CONF_DIR
from guidebench.loggers import build_loggers
from guidebench.paper_comparison import paper_report, paper_table
from guidebench.report import report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="report")
def _main(cfg: DictConfig) -> None:
    r = cfg.report
    out_dir = Path(r.out_dir or r.root or cfg.paths.output_dir)
    rows = report(r.runs, r.root, out_dir, grid=r.grid, grid_size=r.grid_size, grid_order=r.grid_order)
    comparison = paper_table(paper_report(r.runs, r.root, out_dir)) if r.compare_paper else None
    for logger in build_loggers(cfg.get("logger")):
        logger.log_report(cfg, out_dir, rows, Path(r.root).name if r.root else None,
                          {name: out_dir / f"{name}.png" for name in ("tradeoff", "fid_nfe")}, comparison)


def main(cfg: DictConfig | None = None) -> None:
    """The entry point: --compare-paper is report.compare_paper=true; a config passed in is used as it is."""
    if cfg is not None:
        return _main(cfg)
    sys.argv[1:] = ["report.compare_paper=true" if a == "--compare-paper" else a for a in sys.argv[1:]]
    return _main()


if __name__ == "__main__":
    main()
