"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models")."""

from __future__ import annotations

import torch

from guidebench.guidance.cfg import ClassifierFreeGuidance


class CFGZeroStar(ClassifierFreeGuidance):
    """CFG around an optimised unconditional prediction, and zeroed first steps (Fan et al. 2025).

        s* = <D_c, D_u> / ||D_u||^2 (per sample),  D = s* D_u + scale (D_c - s* D_u);  D = 0 for i < zero_init_steps

    as diffusers' ClassifierFreeZeroStarGuidance defines it (its default formulation), here on the x0
    prediction: a zeroed first step predicts the data mean 0 of [-1, 1] images. Every CFG key applies.
    """

    name = "cfg_zero_star"

    def __init__(self, scale: float = 1.0, zero_init_steps: int = 1, **cfg_keys):
        super().__init__(scale, **cfg_keys)
        if zero_init_steps < 0:
            raise ValueError(f"guidance.zero_init_steps must be >= 0, got {zero_init_steps}")
        self.zero_init_steps = int(zero_init_steps)

    def combine(self, cond, uncond, scale):
        c, u = cond.flatten(1).float(), uncond.flatten(1).float()
        alpha = ((c * u).sum(1, keepdim=True) / ((u * u).sum(1, keepdim=True) + 1e-8)).reshape(-1, *(1,) * (cond.ndim - 1))
        return alpha * uncond + scale * (cond - alpha * uncond)

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None):
        if step is not None and step < self.zero_init_steps:
            den = denoiser(x, sigma, labels)
            return den._replace(x0=torch.zeros_like(den.x0))
        return super().__call__(denoiser, x, sigma, labels, mean_form, step)
