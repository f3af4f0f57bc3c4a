"""guidebench-run: sample -> evaluate -> report for one configuration; returns FID for sweepers."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from guidebench.config import CONF_DIR
from guidebench.evaluation.evaluator import evaluate
from guidebench.loggers import build_loggers
from guidebench.report import format_table, write_run_report
from guidebench.sampling import sample


def run(cfg: DictConfig) -> dict:
    """Sample into cfg.sampling.out_dir, score it, write summary.csv and grid.png there; return the metrics.
    Loggers record both stages, as guidebench-sample and guidebench-evaluate would."""
    run_dir = sample(cfg)
    ev = cfg.evaluation
    metrics = evaluate(ev.samples, ev.reference, cfg.metrics, ev.out_dir, cache_dir=ev.cache_dir, device=ev.device,
                       batch_size=ev.batch_size, verbose=ev.verbose, allow_incomplete=ev.allow_incomplete)
    row = write_run_report(run_dir)
    print(format_table([row]))
    for logger in build_loggers(cfg.get("logger")):
        logger.log_evaluate(cfg, run_dir, row)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="run")
def main(cfg: DictConfig) -> float:
    return run(cfg).get("fid", float("nan"))


if __name__ == "__main__":
    main()
