"""Training-free guidance with calibrated off-the-shelf classifiers, EluCD (Ma et al. 2024, "Elucidating
the Design Space of Classifier-Guided Diffusion Generation", ICLR; AlexMaOLS/EluCD).

The classifier is an ordinary image classifier (torchvision ResNet-50/101 on ImageNet, the clean
digits CNN here) whose ReLUs become Softplus(beta) (`guidebench.classifiers.softplus`); it is
calibrated by two temperatures in the guided objective

    log p~(y | x) = tau1 f_y(x) - log sum_j exp(tau2 f_j(x))        (f: the logits)

Two branches, as the original code has them: `EluCDGuidance` (ADM/DDPM, a mean shift) and
`EluCDEDMGuidance` (EDM/Heun, a displacement of the state). The objective is computed as
tau1 f_y - logsumexp(tau2 f); the original evaluates log(exp(.) / sum exp(.)) literally, which is the
same number (3e-6 in float32) until tau f > 88, where the literal form overflows.
"""

from __future__ import annotations

import math

import torch

from guidebench.classifiers.softplus import swap_relu_for_softplus
from guidebench.guidance.base import Guidance, solver_form
from guidebench.guidance.classifier import check_classifier


def calibrated_objective_grad(classifier, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
                              tau1: float, tau2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x sum_b [tau1 f_{y_b}(x_b) - logsumexp_j tau2 f_j(x_b)] float32, the objective [B] detached)."""
    with torch.enable_grad():
        x = x.detach().to(torch.float32).requires_grad_(True)
        logits = classifier(x, sigma).float()
        picked = logits[torch.arange(len(labels), device=labels.device), labels]
        objective = tau1 * picked - torch.logsumexp(tau2 * logits, dim=-1)
        return torch.autograd.grad(objective.sum(), x)[0], objective.detach()


class _EluCD(Guidance):
    """What both branches share: the classifier, the temperatures, the checks.

    softplus_beta swaps the ReLUs of the classifier it is given (None keeps them); a classifier already
    swapped through its own `classifier.softplus_beta` has no ReLU left and keeps its beta.
    """

    def __init__(self, classifier, scale: float, softplus_beta: float | None, tau1: float, tau2: float):
        self.classifier = swap_relu_for_softplus(classifier, softplus_beta) if classifier is not None else None
        self.scale, self.softplus_beta, self.tau1, self.tau2 = float(scale), softplus_beta, float(tau1), float(tau2)
        self.num_steps = None

    def check(self, denoiser, solver=None) -> None:
        check_classifier(self.classifier, denoiser, self.name)
        if not denoiser.num_classes:
            raise ValueError(f"guidance={self.name} guides towards a class label; the backbone has no label space")

    def begin(self, denoiser, sigmas, labels, rng=None) -> None:
        self.num_steps = len(sigmas) - 1


class EluCDGuidance(_EluCD):
    """EluCD's DDPM branch (EluCD DDPM/scripts/classifier_sample.py `design_cond_fn`, gaussian_diffusion.py
    `p_sample`): a shift of the ancestral step's mean, in VP coordinates

        mu' = mu + (Sigma + a_t) s grad_{x0} log p~(y | x0),   x0 = clamp(x0_hat(x_t), -1, 1) detached,
        a_t = max(gamma sin(pi t / K) max_{steps so far} Sigma[0, 0, 0], 0)

    with Sigma the per-pixel posterior variance (learned for ADM), t = K-1 ... 0 the respaced step
    index of K steps. The classifier sees the denoiser's clamped x0 as it is (no resize, no ImageNet
    normalisation, no timestep) and the denoiser is not differentiated: the gradient w.r.t. x0 is
    applied as if it were w.r.t. x_t. Only the mean form exists (the original's DDIM path cannot
    run): use sampler=ddpm. In sigma space the shift is multiplied by sqrt(1 + sigma'^2). On a latent
    backbone (DiT) the classifier sees the decoded x0 and the gradient flows back through the decoder
    (`classifier_sees = "x0"`; the original's DiT code was never released).

    max_variance: 'per_sample' (default) takes each sample's own Sigma[0, 0, 0] into its running max,
    so a sample does not depend on its batch; 'first_in_batch' is the original, which takes batch
    element 0's value for the whole batch.
    Defaults: guided_sample.sh (ADM-128, ResNet-101): s = 1, beta = 3, tau1 = 1, discount 0.5, gamma 0.3.
    """

    name = "elucd"
    classifier_sees = "x0"

    def __init__(self, classifier, scale: float = 1.0, softplus_beta: float | None = 3.0,
                 joint_temperature: float = 1.0, margin_temperature_discount: float = 0.5,
                 gamma_factor: float = 0.3, max_variance: str = "per_sample"):
        if max_variance not in ("per_sample", "first_in_batch"):
            raise ValueError(f"guidance.max_variance must be 'per_sample' or 'first_in_batch', got {max_variance!r}")
        super().__init__(classifier, scale, softplus_beta, joint_temperature,
                         joint_temperature * margin_temperature_discount)
        self.gamma_factor = float(gamma_factor)
        self.max_variance = max_variance
        self.running_max = None

    def check(self, denoiser, solver=None) -> None:
        super().check(denoiser, solver)
        if solver is not None and solver_form(solver) != "mean":
            raise ValueError("guidance=elucd is EluCD's DDPM branch, a shift of the ancestral mean: use sampler=ddpm "
                             "(guidance=elucd_edm is the branch for DDIM/Heun samplers)")

    def begin(self, denoiser, sigmas, labels, rng=None) -> None:
        super().begin(denoiser, sigmas, labels, rng)
        self.running_max = None

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None):
        if not mean_form:
            raise ValueError("guidance=elucd guides the DDPM mean only: use sampler=ddpm (or guidance=elucd_edm)")
        return denoiser(x, sigma, labels)

    def add_value(self, variance_vp: torch.Tensor, step: int) -> torch.Tensor:
        """a_t [B] float64: updates the running max of Sigma[0, 0, 0] and applies the sine schedule."""
        v00 = variance_vp[:, 0, 0, 0].to(torch.float64)
        if self.max_variance == "first_in_batch":
            v00 = v00[:1].expand_as(v00)
        self.running_max = v00 if self.running_max is None else torch.maximum(self.running_max, v00)
        t, k = self.num_steps - 1 - step, self.num_steps
        return (math.sin(math.pi * t / k) * self.running_max * self.gamma_factor).clamp_min(0.0)

    def mean_shift(self, denoiser, x, sigma, sigma_next, labels, variance, den=None, step=None):
        to_vp = (1 + sigma_next.to(torch.float64) ** 2).reshape(-1, 1, 1, 1)
        variance_vp = variance / to_vp
        add = self.add_value(variance_vp, step)
        if self.scale == 0:
            return None
        grad, _ = calibrated_objective_grad(self.classifier, den.x0, sigma, labels, self.tau1, self.tau2)
        shift_vp = (variance_vp + add.reshape(-1, 1, 1, 1)) * (self.scale * grad).to(torch.float64)
        return shift_vp * to_vp.sqrt()


class EluCDEDMGuidance(_EluCD):
    """EluCD's EDM branch (EluCD EDM/generate.py `edm_sampler`): before step i of N, the state moves by

        x <- x + w_i rms(x) g / rms(g),   g = grad_u log p~(y | u),  u = x / rms(x) if rms(x) > 1 else x
        w_i = max(s (N + 1 - i) / (N + 1), 1e-5) + s a sin(pi i / N)

    (rms over C, H, W per sample; s = max_guidance, a = add_factor). The classifier sees the current
    NOISY state rescaled to unit RMS, not D(x); the gradient is taken before the churn noise, and
    both Heun evaluations of the step start from the moved state (it is not a score term). Any
    solver can carry it; the original runs EDM's Heun. A zero gradient moves nothing (the original
    divides 0 by 0).
    Defaults: guided_sample.sh (EDM ImageNet-64, ResNet-101, 10 Heun steps): s = 0.004, a = 0.3,
    beta = 5, tau1 = 1, tau2 = 0 (tau2 = 0 makes the objective the plain logit f_y - log K).
    """

    name = "elucd_edm"

    def __init__(self, classifier, scale: float = 0.004, softplus_beta: float | None = 5.0,
                 joint_temperature: float = 1.0, uncond_temperature: float = 0.0, add_factor: float = 0.3):
        super().__init__(classifier, scale, softplus_beta, joint_temperature, uncond_temperature)
        self.add_factor = float(add_factor)

    def weight(self, i: int) -> float:
        """w_i of step i of N = self.num_steps."""
        n, s = self.num_steps, self.scale
        return max(s / (n + 1) * (n + 1 - i), 1e-5) + math.sin(math.pi * i / n) * s * self.add_factor

    def displace(self, denoiser, x, sigma, labels, step=None):
        if self.scale == 0:
            return x
        x = x.to(torch.float64)
        norm = x.square().mean(dim=(1, 2, 3)).sqrt()
        u = torch.where((norm > 1).reshape(-1, 1, 1, 1), x / norm.reshape(-1, 1, 1, 1), x)
        grad, _ = calibrated_objective_grad(self.classifier, u, sigma, labels, self.tau1, self.tau2)
        grad_rms = grad.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
        unit = torch.where(grad_rms > 0, grad / grad_rms, torch.zeros_like(grad))
        return x + (unit * norm.float().reshape(-1, 1, 1, 1) * self.weight(step)).to(torch.float64)
