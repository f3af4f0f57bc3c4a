"""The one interface between backbones and samplers.

Samplers work in the variance-exploding coordinates of Karras et al. 2022 (EDM, eq. 1):
x = x0 + sigma * n. A VP model whose input is x_t = sqrt(abar) x0 + sqrt(1 - abar) eps sees
x_t = x / sqrt(1 + sigma^2) with sigma^2 = (1 - abar) / abar, so ADM, DiT and EDM networks all
become the same denoiser D(x; sigma, y) ~= E[x0 | x].
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch


class Denoised(NamedTuple):
    """What one denoiser evaluation returns.

    x0:       [B, C, H, W] float32 estimate of the clean image, E[x0 | x; sigma, y].
    var_frac: [B, C, H, W] or None. For models with learned variance (ADM/DiT, Nichol & Dhariwal
              2021 eq. 15) the interpolation weight v in [0, 1] with
              log Sigma = v log beta_t + (1 - v) log beta_tilde_t; None for fixed-variance models.
    renoise_x0: [B, C, H, W] or None. Set by a guidance method that re-noises with another estimate's
              noise (CFG++: the unconditional one); a solver that supports it (`supports_renoise`) takes
              eps = (x - renoise_x0) / sigma for the step's noise direction. None: x0's own.
    """

    x0: torch.Tensor
    var_frac: torch.Tensor | None = None
    renoise_x0: torch.Tensor | None = None


@runtime_checkable
class Denoiser(Protocol):
    """D(x; sigma, y): the contract every backbone adapter fulfils.

    Attributes:
        img_channels, img_resolution: sample shape [C, R, R] in the space the sampler walks
                                      (pixels, or VAE latents for DiT).
        num_classes: number of class labels (0 for an unconditional model).
        null_label:  the label index that means "no class" (CFG's unconditional branch), or None.
        sigma_min, sigma_max: the noise levels the model was trained on.
    """

    img_channels: int
    img_resolution: int
    num_classes: int
    null_label: int | None
    sigma_min: float
    sigma_max: float

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Snap sigma to the nearest level the model supports (identity for continuous models)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Denoised:
        """x: [B, C, H, W] at noise level sigma: [B]; labels: [B] int64 or None -> Denoised."""
