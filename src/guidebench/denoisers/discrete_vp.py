"""Discrete-time VP models (ADM, DiT, the digits model) as sigma-space denoisers."""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from guidebench.denoisers.base import Denoised

Parameterisation = Literal["eps", "x0", "v"]


def betas_for_schedule(name: str, num_steps: int = 1000) -> torch.Tensor:
    """beta_t of ADM's `get_named_beta_schedule`, float64 [T].

    linear: Ho et al. 2020, betas linear in [1e-4, 2e-2] scaled by 1000 / T.
    cosine: Nichol & Dhariwal 2021 eq. 17, abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
            s = 0.008, beta_t = min(1 - abar(t+1)/abar(t), 0.999).
    """
    if name == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if name == "cosine":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999) for i in range(num_steps)],
            dtype=torch.float64,
        )
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


class DiscreteVPDenoiser(torch.nn.Module):
    """A network net(x_t, t, y) trained on T discrete VP steps, as D(x; sigma, y).

    The VP input is x_t = x / sqrt(1 + sigma^2) (Karras et al. 2022, Table 1, VP column) and t is the
    step index whose sigma_t = sqrt((1 - abar_t) / abar_t) is nearest to sigma in log space
    (EDM's iDDPMPrecond.round_sigma; k-diffusion's DiscreteSchedule). The output is read as
        eps: x0 = x - sigma * eps
        x0:  x0 = out
        v:   x0 = sqrt(abar) x_t - sqrt(1 - abar) v   (Salimans & Ho 2022)
    and, with learned variance, the channels after the first C are ADM's v in [-1, 1], returned as
    var_frac = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15). `clip_x0` clamps x0 to [-1, 1] as ADM's
    `clip_denoised` does.
    """

    variance_preserving = True  # samplers start from x_T ~ N(0, I) in VP coordinates

    def __init__(
        self,
        net: torch.nn.Module | Callable,
        betas: torch.Tensor,
        *,
        img_channels: int,
        img_resolution: int,
        num_classes: int = 0,
        null_label: int | None = None,
        parameterisation: Parameterisation = "eps",
        learned_variance: bool = False,
        clip_x0: bool = False,
        timestep_scale: float = 1.0,
    ):
        super().__init__()
        self.net = net
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.num_classes = num_classes
        self.null_label = null_label
        self.parameterisation = parameterisation
        self.learned_variance = learned_variance
        self.clip_x0 = clip_x0
        self.timestep_scale = timestep_scale
        abar = torch.cumprod(1 - betas.to(torch.float64), dim=0)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.register_buffer("sigmas", ((1 - abar) / abar).sqrt(), persistent=False)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the training step nearest to sigma in log space, int64 [B]."""
        log_sigmas = self.sigmas.log()
        dist = (sigma.to(torch.float64).clamp_min(1e-20).log()[:, None] - log_sigmas[None, :]).abs()
        return dist.argmin(dim=1)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=self.sigmas.device)
        return self.sigmas[self.sigma_to_t(sigma.reshape(-1))].reshape(sigma.shape)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Denoised:
        sigma = sigma.to(torch.float64).reshape(-1)
        t = self.sigma_to_t(sigma)
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x = x.to(torch.float32)
        x_t = (x.to(torch.float64) * abar.sqrt()).to(torch.float32)
        out = self.net(x_t, t * self.timestep_scale if self.timestep_scale != 1 else t, labels).to(torch.float32)
        c = self.img_channels
        var_frac = (out[:, c:] + 1) / 2 if self.learned_variance else None
        out = out[:, :c]
        s = self.sigmas[t].reshape(-1, 1, 1, 1)
        if self.parameterisation == "eps":
            x0 = x - (s * out).to(torch.float32)
        elif self.parameterisation == "x0":
            x0 = out
        elif self.parameterisation == "v":
            x0 = (abar.sqrt() * x_t - (1 - abar).sqrt() * out).to(torch.float32)
        else:
            raise ValueError(f"unknown parameterisation {self.parameterisation!r}")
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        return Denoised(x0, var_frac)
