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


def ddim_move(x: torch.Tensor, eps: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The deterministic DDIM step (Song et al. 2021 eq. 12, eta = 0) of x along a given eps, sigma space:
    x' = x + (sigma' - sigma) eps. With the sigmas swapped it is its own exact inverse for the same eps."""
    return x + (sigma_next - sigma) * eps


def _edict_eps(guidance: Guidance, denoiser, z, sigma, sigma_z, labels, step: int) -> torch.Tensor:
    """eps of the latent z (at level sigma_z) predicted at the step's level sigma, as EDICT evaluates it: the network
    gets z's own array with the step's timestep, so a VP model sees z / sqrt(1 + sigma_z^2) at sigma."""
    if getattr(denoiser, "variance_preserving", False):
        z = z * ((1 + sigma**2) / (1 + sigma_z**2)).sqrt()
    return (z - _denoise(guidance, denoiser, z, sigma, labels, step).x0) / sigma


def _edict_order(x, y, i: int):
    """(first, second) latent of step i: x first at even i, y first at odd i (salesforce/DOODL SteppingLayer)."""
    return (x, y) if i % 2 == 0 else (y, x)


def edict_mix(x, y, mix: float):
    """EDICT's mixing (averaging) layer, x first: x'' = p x + (1 - p) y, then y'' = (1 - p) x'' + p y."""
    x = mix * x + (1 - mix) * y
    return x, (1 - mix) * x + mix * y


def edict_unmix(x, y, mix: float):
    """The exact inverse of `edict_mix`: y = (y'' - (1-p) x'') / p, then x = (x'' - (1-p) y) / p."""
    y = (y - (1 - mix) * x) / mix
    return (x - (1 - mix) * y) / mix, y


def edict_step(guidance: Guidance, denoiser, x, y, sigmas, labels, i: int, mix: float = 0.93):
    """EDICT step i (sigmas[i] -> sigmas[i + 1]) of the coupled latents (Wallace et al. 2023, EDICT):
    a = a + (sigma' - sigma) eps(b; sigma), b = b + (sigma' - sigma) eps(a; sigma) with (a, b) = (x, y) at even i and
    (y, x) at odd i, then `edict_mix`. Two denoiser evaluations; deterministic."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    a, b = _edict_order(x, y, i)
    a = ddim_move(a, _edict_eps(guidance, denoiser, b, sigma, sigma, labels, i), sigma, sigma_next)
    b = ddim_move(b, _edict_eps(guidance, denoiser, a, sigma, sigma_next, labels, i), sigma, sigma_next)
    return edict_mix(*_edict_order(a, b, i), mix)


def edict_step_inverse(guidance: Guidance, denoiser, x, y, sigmas, labels, i: int, mix: float = 0.93):
    """The exact inverse of `edict_step` i: unmix, then undo b's update with eps(a), then a's with eps(b)."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    a, b = _edict_order(*edict_unmix(x, y, mix), i)
    b = ddim_move(b, _edict_eps(guidance, denoiser, a, sigma, sigma_next, labels, i), sigma_next, sigma)
    a = ddim_move(a, _edict_eps(guidance, denoiser, b, sigma, sigma, labels, i), sigma_next, sigma)
    return _edict_order(a, b, i)


def edict_chain(denoiser, x, y, sigmas, labels=None, *, guidance: Guidance | None = None,
                callback: Callback | None = None, mix: float = 0.93):
    """All EDICT steps from the pair (x, y) at sigmas[0] to sigmas[-1]; returns the pair (float64)."""
    guidance = guidance or NoGuidance()
    x, y = x.to(torch.float64), y.to(torch.float64)
    guidance.begin(denoiser, sigmas, labels)
    for i in range(len(sigmas) - 1):
        x, y = edict_step(guidance, denoiser, x, y, sigmas, labels, i, mix)
        if callback is not None:
            callback({"i": i, "x": x, "y": y, "sigma": sigmas[i]})
    return x, y


def invert_edict(denoiser, x, y, sigmas, labels=None, *, guidance: Guidance | None = None, mix: float = 0.93):
    """The pair at sigmas[0] that `edict_chain` takes to (x, y) at sigmas[-1]: EDICT inversion, exact up to rounding."""
    guidance = guidance or NoGuidance()
    x, y = x.to(torch.float64), y.to(torch.float64)
    guidance.begin(denoiser, sigmas, labels)
    for i in reversed(range(len(sigmas) - 1)):
        x, y = edict_step_inverse(guidance, denoiser, x, y, sigmas, labels, i, mix)
    return x, y


def _vjp(f, z: torch.Tensor, grad: torch.Tensor):
    """(f(z) detached, grad^T df/dz): one forward with z requiring grad and its backward."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        out = f(z)
        return out.detach(), torch.autograd.grad(out, z, grad)[0]


def edict_vjp(denoiser, x, y, grad_x, grad_y, sigmas, labels=None, *, guidance: Guidance | None = None,
              mix: float = 0.93):
    """Backpropagation through `edict_chain` by inversion: from the final pair (x, y) and dL/d(x, y), the start pair
    and dL/d(start pair).

    Step by step from the last: the mixing is linear (its transpose is applied to the gradient and it is inverted
    exactly); each inverse update b = b' - c eps(a') evaluates eps(a') with a' requiring grad, which gives both the
    inverse and the vector-Jacobian product (c = sigma' - sigma). Only one step's graph and one pair are held, so
    memory does not grow with the number of steps; the cost is 2 denoiser forwards and backwards per step (the
    forward chain's activations are never stored, unlike autograd through the chain).
    """
    guidance = guidance or NoGuidance()
    x, y, gx, gy = (t.to(torch.float64) for t in (x, y, grad_x, grad_y))
    guidance.begin(denoiser, sigmas, labels)
    for i in reversed(range(len(sigmas) - 1)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        c = sigma_next - sigma
        gx_total = gx + (1 - mix) * gy  # transpose of edict_mix: y'' reads x''
        gx, gy = mix * gx_total, mix * gy + (1 - mix) * gx_total
        x, y = edict_unmix(x, y, mix)
        (a, b), (ga, gb) = _edict_order(x, y, i), _edict_order(gx, gy, i)
        eps_a, vjp_a = _vjp(lambda z: _edict_eps(guidance, denoiser, z, sigma, sigma_next, labels, i), a, c * gb)
        b, ga = ddim_move(b, eps_a, sigma_next, sigma), ga + vjp_a
        eps_b, vjp_b = _vjp(lambda z: _edict_eps(guidance, denoiser, z, sigma, sigma, labels, i), b, c * ga)
        a, gb = ddim_move(a, eps_b, sigma_next, sigma), gb + vjp_b
        (x, y), (gx, gy) = _edict_order(a, b, i), _edict_order(ga, gb, i)
    return (x, y), (gx, gy)


def sample_edict(denoiser, x, sigmas, labels=None, *, guidance: Guidance | None = None,
                 rng: StackedRandomGenerator | None = None, callback: Callback | None = None,
                 mix: float = 0.93) -> torch.Tensor:
    """EDICT, Wallace et al. 2023 ("EDICT: Exact Diffusion Inversion via Coupled Transformations", CVPR):
    deterministic DDIM on the coupled pair (x, y) started at (x, x), written in sigma space; returns x.

    Step i (`edict_step`): a = a + (sigma' - sigma) eps(b; sigma), b = b + (sigma' - sigma) eps(a; sigma), with
    (a, b) = (x, y) at even i and (y, x) at odd i (salesforce/DOODL's SteppingLayer; the paper updates x first
    every step), then the mixing x'' = p x' + (1 - p) y', y'' = (1 - p) x'' + p y' (p = `mix`, 0.93). eps(z; sigma)
    is the network's eps at the step's level on z's own array (a VP model sees the updated latent at its new
    scale with the old timestep, as EDICT does). Every step is exactly invertible (`invert_edict`, `edict_vjp`).
    2 denoiser evaluations per step; RNG: none. The original ends at abar_0 (its last step is the identity
    before mixing); on guidebench's schedules the last step goes to sigma = 0.
    """
    return edict_chain(denoiser, x, x, sigmas, labels, guidance=guidance, callback=callback, mix=mix)[0]


sample_edict.invertible = True  # DOODL backpropagates through it by inversion (edict_vjp)
