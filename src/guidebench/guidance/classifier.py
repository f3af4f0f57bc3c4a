"""Classifier guidance (Dhariwal & Nichol 2021) with a noise-aware classifier."""

from __future__ import annotations

import torch

from guidebench.denoisers.base import Denoised
from guidebench.guidance.base import Guidance


def classifier_log_prob_and_grad(classifier, x: torch.Tensor, sigma: torch.Tensor,
                                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x log p_phi(y | x; sigma) [B, C, H, W] float32, the logits [B, K] of the same forward, detached).

    `classifier(x, sigma) -> logits [B, K]` sees x in sigma space; the gradient is taken there.
    """
    with torch.enable_grad():
        x = x.detach().to(torch.float32).requires_grad_(True)
        logits = classifier(x, sigma).float()
        log_probs = torch.log_softmax(logits, dim=-1)
        selected = log_probs[torch.arange(len(labels), device=labels.device), labels]
        return torch.autograd.grad(selected.sum(), x)[0], logits.detach()


def classifier_log_prob_grad(classifier, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x; sigma) for each sample, [B, C, H, W] float32."""
    return classifier_log_prob_and_grad(classifier, x, sigma, labels)[0]


def classifier_device(classifier) -> torch.device:
    """Where the classifier's parameters live (CPU for a parameter-free one): the device of a probe batch."""
    params = next(iter(classifier.parameters()), None) if hasattr(classifier, "parameters") else None
    return params.device if params is not None else torch.device("cpu")


def check_classifier(classifier, denoiser, method: str) -> None:
    """Refuse a classifier that is missing, or does not take the backbone's samples or label space.

    One probe forward on a zero batch at the backbone's [C, R, R] (no resizing is done anywhere: a
    classifier must accept the resolution the sampler walks).
    """
    if classifier is None:
        raise ValueError(f"guidance={method} needs a classifier (set classifier=NAME)")
    c, r = denoiser.img_channels, denoiser.img_resolution
    probe = torch.zeros(1, c, r, r, device=classifier_device(classifier))
    try:
        with torch.no_grad():
            logits = classifier(probe, torch.ones(1, dtype=torch.float64, device=probe.device))
    except RuntimeError as e:
        raise ValueError(f"guidance={method}: the classifier {type(classifier).__name__} does not accept the "
                         f"backbone's {c}x{r}x{r} samples ({e}); choose a classifier made for this resolution") from e
    k = denoiser.num_classes
    if k and logits.shape[-1] != k:
        raise ValueError(f"guidance={method}: the classifier predicts {logits.shape[-1]} classes but the backbone "
                         f"samples labels of {k} classes; choose a classifier of the backbone's label space")


class ClassifierGuidance(Guidance):
    """Dhariwal & Nichol 2021, classifier guidance with scale s.

    DDPM (Alg. 1, mean form):  mu' = mu + s Sigma grad_{x_t} log p_phi(y | x_t, t).
    DDIM / Heun (Alg. 2, score form): eps' = eps - s sqrt(1 - abar) grad_{x_t} log p_phi(y | x_t, t),
    which in sigma space (x = x_t / sqrt(abar)) reads x0' = x0 + s sigma^2 grad_x log p_phi(y | x; sigma).
    In sigma space the mean shift is s Sigma grad_x log p sqrt((1 + sigma^2) / (1 + sigma'^2)), the
    factor mapping the VP gradient and mean to sigma coordinates. s = 0 is unguided; ADM uses s = 1
    (conditional) to 10 (unconditional ImageNet 256). Subclasses may make s per sample (`sample_scale`).
    """

    name = "classifier"

    def __init__(self, classifier, scale: float = 1.0):
        self.classifier = classifier
        self.scale = float(scale)

    def check(self, denoiser, solver=None) -> None:
        check_classifier(self.classifier, denoiser, self.name)

    def sample_scale(self, logits: torch.Tensor) -> torch.Tensor | float:
        """The guidance scale of each sample, from the classifier's logits at x: s for plain guidance."""
        return self.scale

    def scaled_grad(self, x, sigma, labels) -> torch.Tensor:
        """s_b grad_x log p_phi(y_b | x_b; sigma), float32 [B, C, H, W]."""
        grad, logits = classifier_log_prob_and_grad(self.classifier, x, sigma, labels)
        scale = self.sample_scale(logits)
        return grad * (scale.reshape(-1, 1, 1, 1) if torch.is_tensor(scale) else scale)

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None) -> Denoised:
        den = denoiser(x, sigma, labels)
        if mean_form or self.scale == 0:
            return den
        grad = self.scaled_grad(x, sigma, labels)
        return den._replace(x0=den.x0 + sigma.reshape(-1, 1, 1, 1).float() ** 2 * grad)

    def mean_shift(self, denoiser, x, sigma, sigma_next, labels, variance, den=None, step=None):
        if self.scale == 0:
            return None
        grad = self.scaled_grad(x, sigma, labels).to(torch.float64)
        factor = ((1 + sigma.to(torch.float64) ** 2) / (1 + sigma_next.to(torch.float64) ** 2)).sqrt()
        return variance * grad * factor.reshape(-1, 1, 1, 1)
