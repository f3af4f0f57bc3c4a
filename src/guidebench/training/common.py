"""Pieces shared by the training loops: batches, shift augmentation, learning-rate schedule, EMA, accuracy."""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger("guidebench.training")
LOG_EVERY = 100


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatches of indices into n examples, reshuffled every epoch (last partial batch dropped)."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def random_shift(x: torch.Tensor, max_shift: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [B, C, H, W] by integers dy, dx ~ U{-max_shift..max_shift}, padding with `fill`."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=fill)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


class EMA:
    """Exponential moving average of a model's weights, decay min(decay, (1 + n) / (10 + n)) at update n."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    """Fraction of rows of x whose argmax logits predict(x) equal labels."""
    correct = sum(int((predict(x[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, train: dict) -> float:
    """One update with the `cosine_lr` schedule of recipe `train` (steps, lr, warmup); returns the loss value."""
    for group in opt.param_groups:
        group["lr"] = cosine_lr(step, train["steps"], train["lr"], train["warmup"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def training_summary(net: nn.Module, losses: list[float], start: float) -> dict[str, float]:
    """Loss summary, wall time since `start` and parameter count of a finished training run."""
    return {**loss_summary(losses), "train_seconds": time.perf_counter() - start,
            "num_params": sum(p.numel() for p in net.parameters())}


def loss_summary(losses: list[float]) -> dict[str, float]:
    """Mean loss over the first and the last tenth of training (at least one step each)."""
    k = max(len(losses) // 10, 1)
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}


def log_progress(task: str, step: int, steps: int, losses: list[float], start: float) -> None:
    """Log the mean loss of the last LOG_EVERY steps every LOG_EVERY steps and at the end."""
    if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
        recent = losses[-LOG_EVERY:]
        log.info("%s step %d/%d loss %.4f (%.0f s)", task, step + 1, steps, sum(recent) / len(recent),
                 time.perf_counter() - start)
