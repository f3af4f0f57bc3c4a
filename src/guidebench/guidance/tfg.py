"""The training-free guidance family as TFG unifies it (Ye et al. 2024, "TFG: Unified Training-Free Guidance for
Diffusion Models", NeurIPS, Alg. 1; YWolfeee/Training-Free-Guidance): DPS, FreeDoM, MPGD, UGD, LGD and TFG.

A differentiable off-the-shelf predictor f (a classifier of the classifier group, `classifier_sees = "x0"`)
scores the clean estimate x0_hat = D(x; sigma); the objective of sample b is its label's smoothed log-likelihood

    l(x0) = log (1/K) sum_k p_f(y_b | x0 + gamma_i eps_k),  eps_k ~ N(0, I)   (K = 1, gamma_i = 0: log p_f(y_b | x0)).

TFG's step t (VP coordinates, alpha_t = abar_t / abar_{t-1}) adds two terms to the unguided step:

    Delta_t = rho_t grad_{x_t} l(x0_hat(x_t))                     (variance guidance, through the denoiser)
    Delta_0 <- Delta_0 + mu_t grad l(x0_hat + Delta_0), N_iter times from 0   (mean guidance, no backprop through D)
    x_{t-1} = Sample(x_t, x0_hat) + Delta_t / sqrt(alpha_t) + sqrt(abar_{t-1}) Delta_0,

and repeats the step N_recur times, re-noising x_{t-1} back to t in between. In sigma space (x = x_t / sqrt(abar_t),
sigma^2 = (1 - abar) / abar) the guided state is Sample(x, x0_hat) + S with the shift of the next state

    S = w_i grad_x l(D(x; sigma_i)) + Delta_0,   w_i = rho_i (1 + sigma_i^2)           (TFG)

The special cases differ only in w_i, the x0 steps and the recurrence, each as its own paper writes its update
(b_i = sqrt((1 + sigma_i^2)(1 + sigma_{i+1}^2)) is grad_{x_t} added to x_{t-1}, without TFG's 1 / sqrt(alpha_t)):
DPS w_i = zeta b_i / |l|; FreeDoM w_i = rho_i b_i with N_recur; LGD w_i = s b_i with K > 1 and gamma_i = r_t;
MPGD rho = 0, N_iter = 1 (TFG exactly, constant mu); UGD guides the prediction itself (see `UniversalGuidance`).

How a solver receives S without knowing the method: `__call__` returns the prediction
x0 = x0_hat + S sigma / (sigma_i - sigma_{i+1}) (score form; sigma the evaluation's level), whose deterministic DDIM
(eta = 0) or Euler step from sigma_i lands exactly at Sample + S, and with mean_form (DDPM) x0_hat + S sigma^2 /
(sigma^2 - sigma_{i+1}^2), whose posterior mean is mu + S; TFG's own eta = 1 setting is `sampler=ddpm` (DDIM with
eta = 1 is DDPM with fixed-small variance). Heun averages S over its two stages; DDIM with eta > 0 scales it by
(sigma - sigma_down) / (sigma - sigma'). Recurrence (`displace`, at the start of step i): N_recur - 1 rounds of
[the guided deterministic DDIM step to sigma_{i+1}, then x += sqrt(sigma_i^2 - sigma_{i+1}^2) z with z from the rng
`begin` received], so any solver makes the last round. Nothing is kept across steps: each gradient is taken in
its own graph and detached. Not followed: TFG's clip_x0 (x0_hat is the backbone's, clamped where it clamps) and
LGD's code dividing its gradient once more by K.
"""

from __future__ import annotations

import math

import torch

from guidebench.denoisers.base import Denoised
from guidebench.guidance.base import Guidance
from guidebench.guidance.classifier import check_classifier, classifier_device

SCHEDULES = ("increase", "decrease", "constant")


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def _detached(den: Denoised) -> Denoised:
    return Denoised(*(None if t is None else t.detach() for t in den))


def step_schedule(kind: str, sigmas: torch.Tensor) -> torch.Tensor:
    """TFG's normalised step schedule (`get_rho`, `get_mu`) over the N steps of `sigmas` (trailing 0), mean 1:
    increase = alpha_i, decrease = 1 - alpha_i, constant = 1, with alpha_i = abar_i / abar_{i+1} = (1 + sigma_{i+1}^2) /
    (1 + sigma_i^2); each divided by its mean over the steps."""
    s = sigmas.to(torch.float64).cpu()
    alpha = (1 + s[1:] ** 2) / (1 + s[:-1] ** 2)
    value = {"increase": alpha, "decrease": 1 - alpha, "constant": torch.ones_like(alpha)}[kind]
    return value / value.mean()


class TrainingFreeGuidance(Guidance):
    """TFG, Ye et al. 2024 Alg. 1 (module docstring): scale = rho, with mu, gamma, K = n_mc, N_iter = n_iter,
    N_recur = n_recur and the schedules of TFG's code: rho_i = rho s_i, mu_i = mu s_i with `step_schedule`
    s_i, gamma_i = gamma sqrt(1 - abar_i) = gamma sigma / sqrt(1 + sigma^2) (decrease) or gamma (constant).
    The K Monte-Carlo draws of a round are shared by Delta_t and every x0 step, as in TFG's code.
    RNG: with gamma > 0, K `randn_like(x)` per guided evaluation; with N_recur > 1, one per re-noising.
    Defaults: TFG's scripts/cifar10_label.sh (label guidance, CIFAR-10 DDPM).
    """

    name = "tfg"
    classifier_sees = "x0"

    def __init__(self, classifier, scale: float = 1.0, mu: float = 0.25, gamma: float = 0.001, n_mc: int = 1,
                 n_iter: int = 4, n_recur: int = 1, rho_schedule: str = "increase", mu_schedule: str = "increase",
                 gamma_schedule: str = "decrease"):
        for key, kind, allowed in (("rho_schedule", rho_schedule, SCHEDULES), ("mu_schedule", mu_schedule, SCHEDULES),
                                   ("gamma_schedule", gamma_schedule, ("decrease", "constant"))):
            if kind not in allowed:
                raise ValueError(f"guidance.{key} must be one of {', '.join(allowed)}, got {kind!r}")
        for key, value, least in (("n_mc", n_mc, 1), ("n_iter", n_iter, 0), ("n_recur", n_recur, 1)):
            if int(value) != value or value < least:
                raise ValueError(f"guidance.{key} must be an integer >= {least}, got {value!r}")
        if gamma < 0:
            raise ValueError(f"guidance.gamma is a noise scale and must be >= 0, got {gamma}")
        self.classifier = classifier
        self.scale, self.rho_mean, self.mu, self.gamma = float(scale), float(scale), float(mu), float(gamma)
        self.n_mc, self.n_iter, self.n_recur = int(n_mc), int(n_iter), int(n_recur)
        self.rho_schedule, self.mu_schedule, self.gamma_schedule = rho_schedule, mu_schedule, gamma_schedule
        self.sigmas = self.rho = self.mus = self.rng = None

    def check(self, denoiser, solver=None) -> None:
        check_classifier(self.classifier, denoiser, self.name)
        if not denoiser.num_classes:
            raise ValueError(f"guidance={self.name} guides towards a class label; the backbone has no label space")
        check_differentiable(self.classifier, denoiser, self.name)

    def begin(self, denoiser, sigmas, labels, rng=None) -> None:
        if rng is None and (self.gamma > 0 or self.n_recur > 1):
            raise ValueError(f"guidance={self.name} draws noise (gamma > 0 or n_recur > 1): the solver needs an rng")
        self.sigmas, self.rng = sigmas.to(torch.float64).cpu(), rng
        self.rho = (self.rho_mean * step_schedule(self.rho_schedule, sigmas)).tolist()
        self.mus = (self.mu * step_schedule(self.mu_schedule, sigmas)).tolist()

    def time_weight(self, sigma: torch.Tensor, step: int, objective: torch.Tensor) -> torch.Tensor:
        """w_i [B] multiplying grad_x l(D(x; sigma)) in S: rho_i (1 + sigma^2), TFG's Delta_t / sqrt(alpha_t)."""
        return self.rho[step] * (1 + sigma.to(torch.float64) ** 2)

    def noise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """gamma_i eps_k [K, B, C, H, W] of one round (a zero [1, B, C, H, W] without smoothing)."""
        if self.gamma == 0:
            return torch.zeros_like(x)[None]
        unit = sigma / (1 + sigma**2).sqrt() if self.gamma_schedule == "decrease" else torch.ones_like(sigma)
        std = self.gamma * unit
        return torch.stack([self.rng.randn_like(x) for _ in range(self.n_mc)]) * _per_sample(std).to(x)

    def objective(self, x0: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """l(x0) [B] = log mean_k p_f(y | x0 + noise_k), one classifier forward of K B rows at the current sigma."""
        k, n = len(noise), len(x0)
        logits = self.classifier((x0[None] + noise).flatten(0, 1), sigma.repeat(k)).float()
        picked = logits.log_softmax(-1)[torch.arange(k * n, device=logits.device), labels.repeat(k)]
        return picked.reshape(k, n).logsumexp(0) - math.log(k)

    def x0_steps(self, x0: torch.Tensor, sigma, labels, noise, mu: float, n: int) -> torch.Tensor:
        """Delta_0 after n steps Delta_0 <- Delta_0 + mu grad l(x0 + Delta_0) from 0; x0 is a constant (no backprop
        through the denoiser)."""
        delta = torch.zeros_like(x0)
        for _ in range(n if mu else 0):
            with torch.enable_grad():
                z = (x0 + delta).detach().requires_grad_(True)
                delta = delta + mu * torch.autograd.grad(self.objective(z, sigma, labels, noise).sum(), z)[0]
        return delta

    def guide(self, denoiser, x, sigma, labels, step: int) -> tuple[Denoised, torch.Tensor]:
        """One guided evaluation at (x, sigma) of step i: (the prediction the step uses, float32, detached;
        the shift S of the next state, float32)."""
        x = x.detach().to(torch.float32)
        noise = self.noise(x, sigma)
        shift = torch.zeros_like(x)
        if self.rho[step]:
            with torch.enable_grad():
                x_grad = x.requires_grad_(True)
                den = denoiser(x_grad, sigma, labels)
                objective = self.objective(den.x0, sigma, labels, noise)
                grad = torch.autograd.grad(objective.sum(), x_grad)[0]
            den = _detached(den)
            shift = _per_sample(self.time_weight(sigma, step, objective.detach())).float() * grad
        else:
            den = denoiser(x, sigma, labels)
        return den, shift + self.x0_steps(den.x0, sigma, labels, noise, self.mus[step], self.n_iter)

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None) -> Denoised:
        den, shift = self.guide(denoiser, x, sigma, labels, step)
        s, s_i, s_next = sigma.to(torch.float64), self.sigmas[step], self.sigmas[step + 1]
        factor = s**2 / (s**2 - s_next**2) if mean_form else s / (s_i - s_next)
        return den._replace(x0=den.x0 + _per_sample(factor).float() * shift)

    def displace(self, denoiser, x, sigma, labels, step=None):
        sigma_next = self.sigmas[step + 1].to(sigma)
        for _ in range(self.n_recur - 1):
            den, shift = self.guide(denoiser, x, sigma, labels, step)
            x0 = den.x0.to(torch.float64)
            x = x0 + _per_sample(sigma_next / sigma) * (x - x0) + shift.to(torch.float64)
            x = x + _per_sample((sigma**2 - sigma_next**2).sqrt()) * self.rng.randn_like(x)
        return x


def check_differentiable(classifier, denoiser, method: str) -> None:
    """Refuse a predictor through which no gradient reaches its input: one probe backward of log p(y = 0 | x) at a
    fixed random batch must give a finite, nonzero gradient."""
    c, r = denoiser.img_channels, denoiser.img_resolution
    device = classifier_device(classifier)
    probe = torch.randn(2, c, r, r, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)
    fix = ("; choose a differentiable classifier (e.g. classifier=digits_clean on digits), not one that detaches, "
           "rounds or runs its forward under no_grad")
    with torch.enable_grad():
        logits = classifier(probe, torch.ones(2, dtype=torch.float64, device=device)).float()
        out = logits.log_softmax(-1)[:, 0].sum()
        grad = torch.autograd.grad(out, probe, allow_unused=True)[0] if out.requires_grad else None
    if grad is None or not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
        what = "no gradient" if grad is None else "a zero or non-finite gradient"
        raise ValueError(f"guidance={method} differentiates log p(y | x0) through the classifier, but "
                         f"{type(classifier).__name__} passes {what} to its input{fix}")


class FreeDoMGuidance(TrainingFreeGuidance):
    """FreeDoM, Yu et al. 2023 Alg. 1: x_{t-1} = m_t - rho_t grad_{x_t} E(c, x0_hat), E = -l, with time-travel:
    the step is repeated n_recur times, x_t = sqrt(alpha_t) x_{t-1} + sqrt(1 - alpha_t) z in between. In sigma
    space w_i = rho_i b_i, rho_i = scale s_i (`step_schedule`, TFG's freedom.py). FreeDoM travels only inside a
    window of steps; here every step recurs. Defaults: TFG's code (guidance_strength 1, rho increase); n_recur 2.
    """

    name = "freedom"

    def __init__(self, classifier, scale: float = 1.0, n_recur: int = 2, rho_schedule: str = "increase"):
        super().__init__(classifier, scale, mu=0.0, gamma=0.0, n_iter=0, n_recur=n_recur, rho_schedule=rho_schedule)

    def time_weight(self, sigma, step, objective):
        s = sigma.to(torch.float64)
        return self.rho[step] * ((1 + s**2) * (1 + self.sigmas[step + 1].to(s) ** 2)).sqrt()


class DPSGuidance(FreeDoMGuidance):
    """DPS, Chung et al. 2023 Alg. 1: x_{i-1} = x'_{i-1} - zeta_i grad_{x_i} ||y - A(x0_hat)||^2 with zeta_i =
    zeta' / ||y - A(x0_hat)||; for a classifier (TFG's dps.py) x_{i-1} = x'_{i-1} + zeta' grad_{x_i} l / |l|, l =
    log p_f(y | x0_hat). In sigma space w_i = zeta' b_i / |l| (|l| floored at float32 eps); scale = zeta'.
    Default: TFG's code's guidance_strength 1.0 (DPS's own zeta' are for measurement losses).
    """

    name = "dps"

    def __init__(self, classifier, scale: float = 1.0):
        super().__init__(classifier, scale, n_recur=1, rho_schedule="constant")

    def time_weight(self, sigma, step, objective):
        floor = torch.finfo(torch.float32).eps
        return super().time_weight(sigma, step, objective) / objective.abs().clamp_min(floor).to(torch.float64)


class LossGuidedDiffusion(FreeDoMGuidance):
    """LGD-MC, Song et al. 2023 (Monte-Carlo loss guidance): q(x0 | x_t) ~ N(x0_hat, r_t^2 I), r_t = sqrt(1 - abar_t)
    = sigma / sqrt(1 + sigma^2), and grad_{x_t} log (1/K) sum_k exp(l(x0_hat + r_t eps_k)) added to x'_{t-1} with a
    constant strength: w_i = scale b_i, gamma_i = gamma r_t (gamma = 1 is LGD). With K = 1, gamma = 0 it is DPS
    without 1/|l|. Defaults: TFG's code (guidance_strength 1) and K = 4 (its eps_bsz).
    """

    name = "lgd"

    def __init__(self, classifier, scale: float = 1.0, n_mc: int = 4, gamma: float = 1.0):
        TrainingFreeGuidance.__init__(self, classifier, scale, mu=0.0, gamma=gamma, n_mc=n_mc, n_iter=0,
                                      rho_schedule="constant", gamma_schedule="decrease")


class MPGDGuidance(TrainingFreeGuidance):
    """MPGD, He et al. 2024 Alg. 1: x0' = x0_hat + c grad_{x0} l(x0_hat) with no backprop through the denoiser, then
    the DDIM step from (x0', eps_hat): x_{t-1} = Sample(x_t, x0_hat) + sqrt(abar_{t-1}) (x0' - x0_hat). TFG exactly,
    with rho = 0, mu = c constant, N_iter = 1, gamma = 0. scale = c. Default: TFG's code's guidance_strength 1.
    """

    name = "mpgd"

    def __init__(self, classifier, scale: float = 1.0):
        super().__init__(classifier, 0.0, mu=scale, gamma=0.0, n_iter=1, mu_schedule="constant")
        self.scale = float(scale)


class UniversalGuidance(TrainingFreeGuidance):
    """UGD, Bansal et al. 2024 Alg. 1: forward guidance eps' = eps - s sqrt(1 - abar_t) grad_{x_t} l(x0_hat), backward
    guidance Delta_0 from m = n_iter steps Delta_0 <- Delta_0 + s grad l(x0_hat + Delta_0) (TFG's ugd.py; its
    iter_steps = m + 1), eps'' = eps' - sqrt(abar_t / (1 - abar_t)) Delta_0, the step S(x_t, eps'') and
    self-recurrence n_recur times. eps'' changes the prediction itself: in sigma space
    x0'' = x - sigma eps'' = x0_hat + s sigma^2 grad_x l(D(x; sigma)) + Delta_0, what every solver takes (no S).
    Defaults: TFG's code (guidance_strength 1, one backward step); n_recur 2.
    """

    name = "ugd"

    def __init__(self, classifier, scale: float = 1.0, n_iter: int = 1, n_recur: int = 2):
        super().__init__(classifier, scale, mu=scale, gamma=0.0, n_iter=n_iter, n_recur=n_recur,
                         rho_schedule="constant", mu_schedule="constant")

    def time_weight(self, sigma, step, objective):
        return self.scale * sigma.to(torch.float64) ** 2

    def guide(self, denoiser, x, sigma, labels, step):
        den, shift = super().guide(denoiser, x, sigma, labels, step)
        return den._replace(x0=den.x0 + shift), torch.zeros_like(shift)
