"""guidebench-sample: write sample shards for one configuration."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from guidebench.config import CONF_DIR
from guidebench.sampling import sample


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
