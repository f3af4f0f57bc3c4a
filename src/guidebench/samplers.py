"""Solvers that walk a sigma schedule. Each is a small function over a denoiser and a guidance method.

Signature: solver(denoiser, x, sigmas, labels, *, guidance, rng, callback, **options) -> x0 (float64).
`x` is the starting point at sigmas[0] in sigma space (x = x0 + sigma n), `sigmas` a descending
float64 schedule ending in 0 (`guidebench.schedules`), `rng` a `StackedRandomGenerator`.
Solvers never know which guidance method is used: they call `guidance.begin(...)` once, and per step
`guidance.displace(...)`, then `guidance(...)` where they would call the denoiser; the DDPM mean form
also adds `guidance.mean_shift(...)` (docs/guidance.md). Maths in float64 (as EDM).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from guidebench.denoisers.base import Denoised
from guidebench.guidance.base import Guidance, NoGuidance
from guidebench.rng import StackedRandomGenerator

Callback = Callable[[dict], None]


def _sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(device=x.device, dtype=torch.float64).expand(x.shape[0])


def _denoise(guidance: Guidance, denoiser, x, sigma, labels, step: int, **kwargs):
    den = guidance(denoiser, x.to(torch.float32), _sigma_batch(sigma, x), labels, step=step, **kwargs)
    renoise = None if den.renoise_x0 is None else den.renoise_x0.to(torch.float64)
    return den._replace(x0=den.x0.to(torch.float64), renoise_x0=renoise)


def _displace(guidance: Guidance, denoiser, x, sigma, labels, step: int) -> torch.Tensor:
    return guidance.displace(denoiser, x, _sigma_batch(sigma, x), labels, step=step).to(torch.float64)


def sample_ddim(denoiser, x, sigmas, labels=None, *, guidance: Guidance | None = None,
                rng: StackedRandomGenerator | None = None, callback: Callback | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM, Song et al. 2021 eq. 12, written in sigma space.

    With eps = (x - x0_hat) / sigma, the update x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - c^2) eps + c z
    divided by sqrt(abar_{t-1}) is
        x' = x0_hat + sigma_down eps + sigma_up z,
        sigma_up = eta sigma' sqrt(1 - sigma'^2 / sigma^2),  sigma_down = sqrt(sigma'^2 - sigma_up^2).
    eta = 0 is deterministic (the Euler step of the probability-flow ODE); eta = 1 is DDPM with fixed-small
    variance. A prediction with `renoise_x0` (CFG++) takes eps from it instead of from x0_hat.
    RNG: one `randn_like(x)` per step with eta > 0 and sigma' > 0.
    """
    guidance = guidance or NoGuidance()
    x = x.to(torch.float64)
    guidance.begin(denoiser, sigmas, labels, rng=rng)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = _displace(guidance, denoiser, x, sigma, labels, i)
        den = _denoise(guidance, denoiser, x, sigma, labels, i)
        eps = (x - (den.x0 if den.renoise_x0 is None else den.renoise_x0)) / sigma
        sigma_up = eta * sigma_next * (1 - sigma_next**2 / sigma**2).clamp_min(0).sqrt() if eta > 0 else sigma_next * 0
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        x = den.x0 + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * rng.randn_like(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": den.x0})
    return x


def _ddpm_variances(sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-step VP quantities of ADM's (respaced) GaussianDiffusion, derived from abar = 1 / (1 + sigma^2)."""
    abar = 1 / (1 + sigmas[:-1] ** 2)
    abar_prev = 1 / (1 + sigmas[1:] ** 2)
    beta = 1 - abar / abar_prev
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    log_beta_tilde_clipped = beta_tilde.clone()
    if len(beta_tilde) > 1:
        log_beta_tilde_clipped[-1] = beta_tilde[-2]
    return {"abar_prev": abar_prev, "beta": beta, "beta_tilde": beta_tilde,
            "log_beta_tilde_clipped": log_beta_tilde_clipped.log()}


def ddpm_step_moments(x: torch.Tensor, den: Denoised, sigmas: torch.Tensor, i: int,
                      variance: str = "fixed_small") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of p(x' | x) for step i (sigmas[i] -> sigmas[i+1]) of `sample_ddpm`, sigma space, float64.

    Posterior mean (Ho et al. eq. 7) in sigma space: mu = x0_hat + (sigma'^2 / sigma^2)(x - x0_hat).
    VP variance Sigma: fixed_small = beta_tilde_t, fixed_large = beta_t (beta_tilde_1 at the last step),
    learned = exp(v log beta_t + (1 - v) log beta_tilde_t) (Nichol & Dhariwal 2021 eq. 15, beta_tilde
    clipped at t = 0); in sigma space it is Sigma / abar_{t-1}. ADM's VP mean is mu / sqrt(1 + sigma'^2).
    """
    v = _ddpm_variances(sigmas.to(torch.float64).cpu())
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x0 = den.x0.to(torch.float64)
    mean = x0 + (sigma_next**2 / sigma**2) * (x - x0)
    if variance == "learned":
        if den.var_frac is None:
            raise ValueError("variance='learned' needs a denoiser with learned variance (learn_sigma)")
        frac = den.var_frac.to(torch.float64)
        var_vp = (frac * v["beta"][i].log() + (1 - frac) * v["log_beta_tilde_clipped"][i]).exp()
    elif variance == "fixed_large":
        var_vp = torch.full_like(mean, float(v["beta"][i] if i < len(sigmas) - 2 else v["beta_tilde"][i - 1]))
    elif variance == "fixed_small":
        var_vp = torch.full_like(mean, float(v["beta_tilde"][i]))
    else:
        raise ValueError(f"unknown DDPM variance {variance!r}; expected fixed_small, fixed_large or learned")
    return mean, var_vp / v["abar_prev"][i]


def sample_ddpm(denoiser, x, sigmas, labels=None, *, guidance: Guidance | None = None,
                rng: StackedRandomGenerator | None = None, callback: Callback | None = None,
                variance: str = "fixed_small") -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 Alg. 2, with ADM's variances (Nichol & Dhariwal 2021).

    Mean and variance of each step: `ddpm_step_moments`. The guidance mean shift (Dhariwal & Nichol
    2021 Alg. 1) is added to mu; x' = mu + sqrt(Sigma) z, no noise at the last step.
    RNG: one `randn_like(x)` per step except the last.
    """
    if variance not in ("fixed_small", "fixed_large", "learned"):
        raise ValueError(f"unknown DDPM variance {variance!r}; expected fixed_small, fixed_large or learned")
    guidance = guidance or NoGuidance()
    x = x.to(torch.float64)
    guidance.begin(denoiser, sigmas, labels, rng=rng)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = _displace(guidance, denoiser, x, sigma, labels, i)
        den = _denoise(guidance, denoiser, x, sigma, labels, i, mean_form=True)
        mean, var = ddpm_step_moments(x, den, sigmas, i, variance)
        shift = guidance.mean_shift(denoiser, x.to(torch.float32), _sigma_batch(sigma, x),
                                    _sigma_batch(sigma_next, x), labels, var, den=den, step=i)
        if shift is not None:
            mean = mean + shift.to(torch.float64)
        x = mean + var.sqrt() * rng.randn_like(x) if sigma_next > 0 else mean
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": den.x0})
    return x


sample_ddpm.guidance_form = "mean"
sample_ddim.supports_renoise = True


def sample_heun(denoiser, x, sigmas, labels=None, *, guidance: Guidance | None = None,
                rng: StackedRandomGenerator | None = None, callback: Callback | None = None,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
                S_noise: float = 1.0) -> torch.Tensor:
    """EDM's stochastic Heun sampler, Karras et al. 2022 Alg. 2.

    gamma_i = min(S_churn / N, sqrt(2) - 1) for sigma_i in [S_min, S_max]; sigma_hat = sigma_i (1 + gamma_i);
    x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise z; Euler step with d = (x_hat - D(x_hat)) / sigma_hat,
    then the trapezoidal correction unless sigma_{i+1} = 0.
    RNG: with S_churn > 0, one `randn_like(x)` per step, also where gamma_i = 0 (outside [S_min, S_max]),
    as EDM's edm_sampler, so its per-seed noise streams are reproduced; none when S_churn = 0.
    """
    guidance = guidance or NoGuidance()
    x = x.to(torch.float64)
    n = len(sigmas) - 1
    guidance.begin(denoiser, sigmas, labels, rng=rng)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = _displace(guidance, denoiser, x, sigma, labels, i)
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= float(sigma) <= S_max else 0.0
        sigma_hat = sigma
        if S_churn > 0:
            noise = rng.randn_like(x)
            if gamma > 0:
                sigma_hat = torch.as_tensor(denoiser.round_sigma(sigma + gamma * sigma), dtype=torch.float64)
                x = x + (sigma_hat**2 - sigma**2).sqrt() * S_noise * noise
        den = _denoise(guidance, denoiser, x, sigma_hat, labels, i)
        d = (x - den.x0) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            den_next = _denoise(guidance, denoiser, x_next, sigma_next, labels, i)
            d_next = (x_next - den_next.x0) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": den.x0})
    return x
