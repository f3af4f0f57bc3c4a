"""Denoisers: every backbone, seen by the samplers as D(x; sigma, y) -> x0_hat."""

from guidebench.denoisers.base import Denoised, Denoiser
from guidebench.denoisers.discrete_vp import DiscreteVPDenoiser
from guidebench.denoisers.preconditioned import EDMDenoiser

__all__ = ["Denoised", "Denoiser", "DiscreteVPDenoiser", "EDMDenoiser"]
