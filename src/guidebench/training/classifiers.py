"""Training of the digits guidance classifiers: cross-entropy, AdamW, cosine learning rate, +-1 pixel shifts.

noisy_classifier: ADM's recipe (Dhariwal & Nichol 2021, sec. 4): each image is noised at a step
    t ~ U{0..T-1} of the diffusion model's schedule, x = x0 + sigma_t n in sigma space; with
    train.ect_lambda = lam > 0 the loss is ED-DPM's CE + lam (ln C - H(p)) (`guidebench.training.ect`).
clean_classifier: clean images only.
Both train on the train split and are scored on the heldout split.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.nn import functional as F

from guidebench.backbones.digits import BETA_SCHEDULE, NUM_TIMESTEPS
from guidebench.classifiers.digits import CleanDigitsClassifier, NoisyDigitsClassifier
from guidebench.data.digits import load_digits_split
from guidebench.denoisers.discrete_vp import betas_for_schedule
from guidebench.training.common import (
    accuracy, batch_indices, log_progress, optimizer_step, random_shift, training_summary,
)
from guidebench.training.ect import check_ect_lambda, ect_loss

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


@torch.no_grad()
def noisy_entropy(classifier, images: torch.Tensor, sigma: float, seed: int = EVAL_SEED) -> float:
    """Mean predictive entropy H(p(. | x; sigma)) in nats on x = images + sigma n, the noise of `noisy_accuracy`."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    log_p = classifier(images + sigma * noise, torch.full((len(images),), sigma)).log_softmax(-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean())


def _fit(task: str, build: Callable[[], torch.nn.Module], train: dict, noise_sigmas: torch.Tensor | None,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
         ) -> tuple[torch.nn.Module, dict]:
    """Seed with train["seed"], then build() the model (so its initial weights are seeded too) and train it."""
    torch.manual_seed(train["seed"])
    gen = torch.Generator().manual_seed(train["seed"])
    model = build()
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
        loss = loss_fn(model(x, sigma), y)
        losses.append(optimizer_step(opt, loss, step, train))
        log_progress(task, step, train["steps"], losses, start)
    model.eval().requires_grad_(False)
    return model, training_summary(model, losses, start)


def train_noisy_classifier(model: dict, train: dict) -> tuple[torch.nn.Module, dict]:
    """Train NoisyDigitsClassifier(**model) with ECT weight train["ect_lambda"] (0 = cross-entropy); metrics
    include heldout accuracy at the EVAL_TIMESTEPS' sigmas."""
    lam = check_ect_lambda(train["ect_lambda"])
    sigmas = schedule_sigmas()
    net, metrics = _fit("noisy_classifier", lambda: NoisyDigitsClassifier(**model), train, sigmas,
                        lambda logits, y: ect_loss(logits, y, lam)["loss"])
    heldout = load_digits_split("heldout")
    levels = [float(sigmas[t]) for t in EVAL_TIMESTEPS]
    metrics["heldout_sigma"] = levels
    metrics["heldout_accuracy"] = [noisy_accuracy(net, heldout.images, heldout.labels, s) for s in levels]
    return net, metrics


def train_clean_classifier(model: dict, train: dict) -> tuple[torch.nn.Module, dict]:
    """Train CleanDigitsClassifier(**model); metrics include its heldout accuracy on clean images."""
    net, metrics = _fit("clean_classifier", lambda: CleanDigitsClassifier(**model), train, None)
    heldout = load_digits_split("heldout")
    metrics["heldout_accuracy"] = accuracy(lambda v: net(v, None), heldout.images, heldout.labels)
    return net, metrics
