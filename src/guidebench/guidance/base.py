"""The guidance interface: called by a solver where it would call the denoiser."""

from __future__ import annotations

import torch

from guidebench.denoisers.base import Denoised


class Guidance:
    """A guidance method changes one step.

    `__call__(denoiser, x, sigma, labels, mean_form=False) -> Denoised` replaces D(x; sigma, y).
    Solvers in the DDPM mean form (Dhariwal & Nichol 2021, Alg. 1) pass mean_form=True and add
    `mean_shift(...)` to the posterior mean; methods that guide through the mean return the
    unguided prediction from `__call__` in that case and the shift from `mean_shift`.
    `scale` is the method's strength (for CFG in the EDM/DiT convention, 1 = unguided).
    """

    name = "guidance"
    scale: float = 1.0

    def __call__(self, denoiser, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                 mean_form: bool = False) -> Denoised:
        return denoiser(x, sigma, labels)

    def mean_shift(self, denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                   labels: torch.Tensor | None, variance: torch.Tensor) -> torch.Tensor | None:
        """Shift of the DDPM posterior mean (sigma space), or None for methods that guide D itself."""
        return None

    def check(self, denoiser) -> None:
        """Raise a clear error if this method cannot guide `denoiser`."""


class NoGuidance(Guidance):
    """Plain conditional (or unconditional) sampling."""

    name = "none"
