"""Backbones: released diffusion networks, each loaded as a `guidebench.denoisers.Denoiser`."""
