"""Diffusion training: Ho et al. 2020, eq. 14 (L_simple), with label dropout and an EMA of the weights.

Per step: x0 from the train split, t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss = ||eps - net(x_t, t, y)||^2 averaged over pixels,
where y is replaced by the null label with probability `label_dropout` (Ho & Salimans 2022), so the
one network is both the conditional and the unconditional model.
"""

from __future__ import annotations

import time

import torch

from guidebench.backbones.digits import BETA_SCHEDULE, NUM_TIMESTEPS, DigitsUNet
from guidebench.data.digits import load_digits_split
from guidebench.denoisers.discrete_vp import betas_for_schedule
from guidebench.training.common import EMA, batch_indices, log_progress, optimizer_step, training_summary


def train_diffusion(model: dict, train: dict) -> tuple[torch.nn.Module, dict]:
    """Train DigitsUNet(**model) with recipe `train`; returns (EMA network, metrics)."""
    torch.manual_seed(train["seed"])
    gen = torch.Generator().manual_seed(train["seed"])
    data = load_digits_split("train")
    net = DigitsUNet(**model)
    ema = EMA(net, train["ema_decay"])
    opt = torch.optim.AdamW(net.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    abar = torch.cumprod(1 - betas_for_schedule(BETA_SCHEDULE, NUM_TIMESTEPS), 0).to(torch.float32)
    null = net.num_classes
    losses, start = [], time.perf_counter()
    net.train()
    for step, idx in zip(range(train["steps"]), batch_indices(len(data), train["batch_size"], gen)):
        x0, y = data.images[idx], data.labels[idx]
        y = torch.where(torch.rand(len(y), generator=gen) < train["label_dropout"], null, y)
        t = torch.randint(0, NUM_TIMESTEPS, (len(y),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].reshape(-1, 1, 1, 1)
        loss = (net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y) - eps).square().mean()
        losses.append(optimizer_step(opt, loss, step, train))
        ema.update(net)
        log_progress("diffusion", step, train["steps"], losses, start)
    return ema.model, training_summary(net, losses, start)
