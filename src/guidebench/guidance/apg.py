"""Adaptive projected guidance, APG (Sadat et al. 2025, "Eliminating Oversaturation and Artifacts of High
Guidance Scales in Diffusion Models", ICLR)."""

from __future__ import annotations

import torch

from guidebench.guidance.cfg import ClassifierFreeGuidance


class AdaptiveProjectedGuidance(ClassifierFreeGuidance):
    """CFG's update split into parts parallel and orthogonal to the conditional x0 prediction (Sadat et al. 2025).

        Delta = D_c - D_u;  Delta <- Delta + beta Delta_prev (reverse momentum, beta < 0, over the trajectory)
        Delta <- Delta min(1, r / ||Delta||)                 (norm threshold r; None: no clipping)
        Delta_par = <Delta, D_c> D_c / ||D_c||^2,  Delta_orth = Delta - Delta_par
        D = D_c + (scale - 1) (Delta_orth + eta Delta_par)

    on the denoised prediction x0 as the paper does (per sample, norms over C, H, W). eta = 1, beta = 0 and
    no threshold is CFG. The momentum is reset per trajectory (`begin`) and advances at every guided
    evaluation (both Heun stages). diffusers' AdaptiveProjectedGuidance matches with
    use_original_formulation=True and guidance_scale = scale - 1. Every CFG key (interval, schedule,
    rescale, channels) applies.
    """

    name = "apg"

    def __init__(self, scale: float = 1.0, eta: float = 0.0, momentum: float = -0.5,
                 norm_threshold: float | None = None, **cfg_keys):
        super().__init__(scale, **cfg_keys)
        if norm_threshold is not None and norm_threshold <= 0:
            raise ValueError(f"guidance.norm_threshold must be > 0 (or null: no clipping), got {norm_threshold}")
        self.eta, self.momentum, self.norm_threshold = float(eta), float(momentum), norm_threshold
        self.running = None

    def begin(self, denoiser, sigmas, labels, rng=None) -> None:
        super().begin(denoiser, sigmas, labels, rng)
        self.running = None

    def combine(self, cond, uncond, scale):
        dims = tuple(range(1, cond.ndim))
        diff = cond - uncond
        if self.momentum:
            self.running = diff if self.running is None else diff + self.momentum * self.running
            diff = self.running
        if self.norm_threshold is not None:
            diff = diff * (self.norm_threshold / torch.linalg.vector_norm(diff, dim=dims, keepdim=True)).clamp(max=1.0)
        unit = torch.nn.functional.normalize(cond.double().flatten(1), dim=1).reshape(cond.shape)
        parallel = ((diff.double() * unit).sum(dim=dims, keepdim=True) * unit).to(diff.dtype)
        return cond + (scale - 1) * (diff - parallel + self.eta * parallel)
