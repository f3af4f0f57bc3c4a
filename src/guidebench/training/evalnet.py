"""Training of the evaluation network on the heldout split (uint8 images, +-1 pixel shifts, cross-entropy).

Its reported accuracy is on the train split, which it never sees (guidebench.data.digits).
"""

from __future__ import annotations

import time

import torch

from guidebench.data.digits import load_digits_split
from guidebench.evaluation.digits_evalnet import DigitsEvalNet
from guidebench.training.common import (
    accuracy, batch_indices, log_progress, optimizer_step, random_shift, training_summary,
)


def evalnet_accuracy(net: DigitsEvalNet, split: str) -> float:
    """Accuracy of the evaluation network on the clean uint8 images of `split`."""
    data = load_digits_split(split)
    return accuracy(lambda v: net(v)["logits"], data.images_uint8.permute(0, 3, 1, 2), data.labels)


def train_evalnet(model: dict, train: dict) -> tuple[torch.nn.Module, dict]:
    """Train DigitsEvalNet(**model) on heldout; metrics: accuracy on train (unseen) and heldout (seen)."""
    torch.manual_seed(train["seed"])
    gen = torch.Generator().manual_seed(train["seed"])
    data = load_digits_split("heldout")
    images = data.images_uint8.permute(0, 3, 1, 2).contiguous()
    net = DigitsEvalNet(**model)
    opt = torch.optim.AdamW(net.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    losses, start = [], time.perf_counter()
    net.train()
    for step, idx in zip(range(train["steps"]), batch_indices(len(data), train["batch_size"], gen)):
        x = random_shift(images[idx], train["max_shift"], 0, gen)
        loss = torch.nn.functional.cross_entropy(net(x)["logits"], data.labels[idx])
        losses.append(optimizer_step(opt, loss, step, train))
        log_progress("evalnet", step, train["steps"], losses, start)
    net.eval().requires_grad_(False)
    metrics = {**training_summary(net, losses, start),
               "train_split_accuracy": evalnet_accuracy(net, "train"),
               "heldout_split_accuracy": evalnet_accuracy(net, "heldout")}
    return net, metrics
