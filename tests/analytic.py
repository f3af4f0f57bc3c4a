"""Denoisers and classifiers with closed forms, for testing samplers and guidance exactly.

Data: x0 ~ N(mu_y, s^2 I) for class y (mu_null = 0 for the null label). The ideal denoiser is
E[x0 | x; sigma, y] = mu_y + s^2 / (s^2 + sigma^2) (x - mu_y), and the probability-flow ODE moves a
point as x(sigma) - mu = (x(sigma_0) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)).
"""

from __future__ import annotations

import torch

from guidebench.denoisers import Denoised, DiscreteVPDenoiser
from guidebench.denoisers.discrete_vp import betas_for_schedule


class GaussianDenoiser(torch.nn.Module):
    """Exact continuous-sigma denoiser of a class-conditional Gaussian (VE coordinates)."""

    def __init__(self, mus: torch.Tensor, s: float = 0.5, shape=(1, 4, 4), sigma_min=0.002, sigma_max=80.0):
        super().__init__()
        self.mus = mus.to(torch.float32)  # [K, C, H, W]
        self.s = s
        self.img_channels, self.img_resolution = shape[0], shape[1]
        self.num_classes = len(mus)
        self.null_label = len(mus)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.calls = []

    def mu(self, labels):
        mus = torch.cat([self.mus, torch.zeros_like(self.mus[:1])])
        return mus[labels] if labels is not None else torch.zeros_like(self.mus[:1])

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, labels):
        self.calls.append(len(x))
        mu = self.mu(labels)
        k = (self.s**2 / (self.s**2 + sigma.to(torch.float64) ** 2)).reshape(-1, 1, 1, 1)
        return Denoised((mu + k * (x - mu)).to(torch.float32))


class GaussianEpsNet(torch.nn.Module):
    """The same Gaussian as a discrete-time VP eps-prediction network net(x_t, t, y)."""

    def __init__(self, gaussian: GaussianDenoiser, betas: torch.Tensor):
        super().__init__()
        self.gaussian = gaussian
        self.abar = torch.cumprod(1 - betas, 0)

    def forward(self, x_t, t, y):
        abar = self.abar[t].reshape(-1, 1, 1, 1)
        sigma = ((1 - abar) / abar).sqrt().reshape(-1)
        x = x_t.to(torch.float64) / abar.sqrt()
        x0 = self.gaussian(x, sigma, y).x0.to(torch.float64)
        return ((x_t - abar.sqrt() * x0) / (1 - abar).sqrt()).to(torch.float32)


def gaussian_vp(mus: torch.Tensor, s: float = 0.5, schedule: str = "cosine", steps: int = 1000) -> DiscreteVPDenoiser:
    betas = betas_for_schedule(schedule, steps)
    g = GaussianDenoiser(mus, s, shape=tuple(mus.shape[1:]))
    return DiscreteVPDenoiser(GaussianEpsNet(g, betas), betas, img_channels=mus.shape[1],
                              img_resolution=mus.shape[2], num_classes=len(mus), null_label=len(mus))


class LinearClassifier(torch.nn.Module):
    """logits_k = <w_k, x> + b_k (ignores sigma): grad_x log p(y|x) = w_y - sum_k p_k w_k."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w, self.b = w, b  # [K, C, H, W], [K]

    def forward(self, x, sigma):
        return x.flatten(1) @ self.w.flatten(1).T + self.b

    def grad_log_prob(self, x, labels):
        p = torch.softmax(self(x, None), dim=1)
        return self.w[labels] - torch.einsum("bk,kchw->bchw", p, self.w)


MUS = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # the guidance tests' 3 class means


def batch(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n states x [n, 1, 4, 4], noise levels sigma in [0.1, 3.1) (float64) and labels in {0, 1, 2}, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 4, 4, generator=g), torch.rand(n, generator=g).double() * 3 + 0.1,
            torch.randint(0, 3, (n,), generator=g))
