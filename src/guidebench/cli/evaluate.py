"""guidebench-evaluate: score a run folder, shard folder, ADM npz or image folder; writes metrics.json."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from guidebench.config import CONF_DIR
from guidebench.evaluation.evaluator import evaluate
from guidebench.loggers import build_loggers
from guidebench.report import summarize


def default_out_dir(samples: str | Path, fallback: str | Path) -> Path:
    """A run folder holds its own metrics.json; other sources' go to `fallback`."""
    samples = Path(samples)
    return samples if (samples / "shards").is_dir() or (samples / "run.json").is_file() else Path(fallback)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    ev = cfg.evaluation
    out_dir = ev.out_dir or default_out_dir(ev.samples, cfg.paths.output_dir)
    evaluate(ev.samples, ev.reference, cfg.metrics, out_dir, cache_dir=ev.cache_dir, device=ev.device,
             batch_size=ev.batch_size, verbose=ev.verbose, allow_incomplete=ev.allow_incomplete)
    for logger in build_loggers(cfg.get("logger")):
        logger.log_evaluate(cfg, out_dir, summarize(out_dir))


if __name__ == "__main__":
    main()
