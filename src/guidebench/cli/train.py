"""guidebench-train: train one of the digits benchmark's models and write its checkpoint.

    guidebench-train task=diffusion|noisy_classifier|clean_classifier|evalnet [train.steps=N] [out=PATH]
"""

from __future__ import annotations

import logging
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from guidebench.checkpoints import sha256_file
from guidebench.config import CONF_DIR
from guidebench.training.checkpoint import save_checkpoint

log = logging.getLogger(__name__)


def _trainers() -> dict[str, Callable[[dict, dict], tuple[torch.nn.Module, dict]]]:
    from guidebench.training.classifiers import train_clean_classifier, train_noisy_classifier
    from guidebench.training.diffusion import train_diffusion
    from guidebench.training.evalnet import train_evalnet
    from guidebench.training.ppap import train_ppap_experts

    return {"diffusion": train_diffusion, "noisy_classifier": train_noisy_classifier,
            "clean_classifier": train_clean_classifier, "evalnet": train_evalnet, "ppap_experts": train_ppap_experts}


def train(cfg: DictConfig) -> dict:
    """Train cfg.task with cfg.model / cfg.train, save to cfg.out; returns the metrics, checkpoint and sha256."""
    trainers = _trainers()
    if cfg.task not in trainers:
        raise ValueError(f"unknown task={cfg.task}; expected one of {', '.join(trainers)}")
    config = {"task": cfg.task, "model": OmegaConf.to_container(cfg.model, resolve=True),
              "train": OmegaConf.to_container(cfg.train, resolve=True)}
    module, metrics = trainers[cfg.task](config["model"], config["train"])
    path = save_checkpoint(cfg.out, module, config, metrics)
    result = {**metrics, "checkpoint": str(path), "sha256": sha256_file(path)}
    log.info("task=%s %s", cfg.task, result)
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    train(cfg)


if __name__ == "__main__":
    main()
