"""Training of the digits guidance classifiers: cross-entropy, AdamW, cosine learning rate, +-1 pixel shifts.

noisy_classifier: ADM's recipe (Dhariwal & Nichol 2021, sec. 4): each image is noised at a step
    t ~ U{0..T-1} of the diffusion model's schedule, x = x0 + sigma_t n in sigma space.
clean_classifier: clean images only.
Both train on the train split and are scored on the heldout split.
"""

from __future__ import annotations

import time

import torch

from guidebench.backbones.digits import BETA_SCHEDULE, NUM_TIMESTEPS
from guidebench.classifiers.digits import CleanDigitsClassifier, NoisyDigitsClassifier
from guidebench.data.digits import load_digits_split
from guidebench.denoisers.discrete_vp import betas_for_schedule
from guidebench.training.common import (
    accuracy, batch_indices, log_progress, optimizer_step, random_shift, training_summary,
)

EVAL_SEED = 12345
EVAL_TIMESTEPS = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)


def schedule_sigmas() -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of the digits diffusion model's T steps, float64 [T]."""
    abar = torch.cumprod(1 - betas_for_schedule(BETA_SCHEDULE, NUM_TIMESTEPS), 0)
    return ((1 - abar) / abar).sqrt()


def noisy_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor, sigma: float,
                   seed: int = EVAL_SEED) -> float:
    """Accuracy on images + sigma n, n ~ N(0, I) drawn from torch.Generator().manual_seed(seed)."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    x = images + sigma * noise
    return accuracy(lambda v: classifier(v, torch.full((len(v),), sigma)), x, labels)


def _fit(task: str, model: torch.nn.Module, train: dict,
         noise_sigmas: torch.Tensor | None) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(train["seed"])
    gen = torch.Generator().manual_seed(train["seed"])
    data = load_digits_split("train")
    opt = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    losses, start = [], time.perf_counter()
    model.train()
    for step, idx in zip(range(train["steps"]), batch_indices(len(data), train["batch_size"], gen)):
        x, y = random_shift(data.images[idx], train["max_shift"], -1.0, gen), data.labels[idx]
        if noise_sigmas is None:
            sigma = torch.zeros(len(y))
        else:
            sigma = noise_sigmas[torch.randint(0, len(noise_sigmas), (len(y),), generator=gen)].to(torch.float32)
            x = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x, sigma), y)
        losses.append(optimizer_step(opt, loss, step, train))
        log_progress(task, step, train["steps"], losses, start)
    model.eval().requires_grad_(False)
    return model, training_summary(model, losses, start)


def train_noisy_classifier(model: dict, train: dict) -> tuple[torch.nn.Module, dict]:
    """Train NoisyDigitsClassifier(**model); metrics include heldout accuracy at the EVAL_TIMESTEPS' sigmas."""
    sigmas = schedule_sigmas()
    net, metrics = _fit("noisy_classifier", NoisyDigitsClassifier(**model), train, sigmas)
    heldout = load_digits_split("heldout")
    levels = [float(sigmas[t]) for t in EVAL_TIMESTEPS]
    metrics["heldout_sigma"] = levels
    metrics["heldout_accuracy"] = [noisy_accuracy(net, heldout.images, heldout.labels, s) for s in levels]
    return net, metrics


def train_clean_classifier(model: dict, train: dict) -> tuple[torch.nn.Module, dict]:
    """Train CleanDigitsClassifier(**model); metrics include its heldout accuracy on clean images."""
    net, metrics = _fit("clean_classifier", CleanDigitsClassifier(**model), train, None)
    heldout = load_digits_split("heldout")
    metrics["heldout_accuracy"] = accuracy(lambda v: net(v, None), heldout.images, heldout.labels)
    return net, metrics
