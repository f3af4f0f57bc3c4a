"""The checkpoint format of models trained by guidebench-train.

A torch.save'd dict readable with torch.load(weights_only=True):
    state_dict  the module's parameters and buffers (the EMA weights for the diffusion model)
    config      {"task", "model", "train"}: the task name, the constructor kwargs, the training recipe
    metrics     numbers measured at the end of training (losses, accuracies, seconds)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from guidebench.checkpoints import CheckpointError, load_state_dict_checked, load_torch_file

M = TypeVar("M", bound=nn.Module)


def train_command(task: str) -> str:
    """The command that makes the shipped checkpoint of `task`."""
    return f"guidebench-train task={task} out=checkpoints/digits/{task}.pt"


def save_checkpoint(path: str | Path, module: nn.Module, config: dict, metrics: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save({"state_dict": state_dict, "config": config, "metrics": metrics}, path)
    return path


def load_trained(checkpoint: str | Path, task: str, build: Callable[..., M], config_key: str) -> M:
    """Rebuild `build(**config["model"])` from a guidebench-train checkpoint of `task`; eval mode, frozen."""
    source = train_command(task)
    ckpt = load_torch_file(checkpoint, source=source, config_key=config_key)
    if not isinstance(ckpt, dict) or not {"state_dict", "config"} <= ckpt.keys():
        raise CheckpointError(f"{checkpoint} is not a guidebench-train checkpoint (needs keys state_dict, config). "
                              f"Make it with: {source}")
    found = ckpt["config"].get("task")
    if found != task:
        raise CheckpointError(f"{checkpoint} holds a task={found} model, expected task={task}. Make it with: {source}")
    module = build(**ckpt["config"]["model"])
    load_state_dict_checked(module, ckpt["state_dict"], path=checkpoint, source=source)
    return module.eval().requires_grad_(False)
