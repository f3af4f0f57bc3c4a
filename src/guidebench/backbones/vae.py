"""The VAE decoder stage of latent diffusion (Rombach et al. 2022), as DiT samples with it.

DiT (Peebles & Xie 2023) diffuses the 4 x H/8 x W/8 latents of Stable Diffusion's KL-f8 autoencoder,
fine-tuned as stabilityai/sd-vae-ft-ema (sample_ddp.py's default) or sd-vae-ft-mse, multiplied by
0.18215; sample.py decodes with `vae.decode(z / 0.18215).sample`. EDM2 (Karras et al. 2024) whitens the
sd-vae-ft-mse latents per channel, z = raw * scale + bias, and runs the VAE on [0, 1] pixels
(`guidebench.backbones.edm2.load_decoder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from guidebench.checkpoints import CheckpointError, download_advice

VAE_SOURCE = ("https://huggingface.co/stabilityai/{name} (huggingface-cli download stabilityai/{name} "
              "--local-dir {path})")


class VAEDecoder(nn.Module):
    """latents z [B, 4, h, w] (scaled, any float dtype) -> images [B, 3, 8h, 8w] in [-1, 1].

    y = decode((z - bias) / scale), scale and bias scalars or per channel. pixel_range (-1, 1) (Stable
    Diffusion, DiT): images = clamp(y, -1, 1), float32. pixel_range (0, 1) (EDM2): images = 2 clamp(y, 0, 1) - 1
    in float64, so that (images + 1) / 2 is the VAE's float32 output exactly (uint8_rule edm2_vae).
    Differentiable (training-free guidance of latent models back-propagates through it); the autoencoder's
    weights are frozen.
    """

    def __init__(self, vae: nn.Module, scale: float | Sequence[float] = 0.18215, bias: float | Sequence[float] = 0.0,
                 pixel_range: Sequence[float] = (-1, 1)):
        super().__init__()
        if tuple(pixel_range) not in ((-1, 1), (0, 1)):
            raise ValueError(f"VAE pixel_range {pixel_range}; expected (-1, 1) or (0, 1)")
        self.vae = vae.eval().requires_grad_(False)
        self.pixel_range = tuple(pixel_range)
        for name, value in (("scale", scale), ("bias", bias)):
            if np.ndim(value):
                self.register_buffer(name, torch.tensor(value, dtype=torch.float32).reshape(1, -1, 1, 1))
            else:
                setattr(self, name, float(value))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(((latents - self.bias) / self.scale).to(dtype)).sample.float()
        if self.pixel_range == (-1, 1):
            return images.clamp(-1, 1)
        return 2 * images.clamp(0, 1).to(torch.float64) - 1


def load_decoder(path: str | Path, scale: float | Sequence[float] = 0.18215, bias: float | Sequence[float] = 0.0,
                 pixel_range: Sequence[float] = (-1, 1), config_key: str = "backbone.decoder.path") -> VAEDecoder:
    """A diffusers AutoencoderKL folder (config.json + weights, e.g. sd-vae-ft-ema) as a `VAEDecoder`; never downloads."""
    from diffusers import AutoencoderKL

    path = Path(path).expanduser()
    source = VAE_SOURCE.format(name=path.name if path.name.startswith("sd-vae-ft-") else "sd-vae-ft-ema", path=path)
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"missing VAE folder {path} (no config.json; set {config_key}=PATH). Get it from: "
                              f"{source}{download_advice(path)}")
    kind = json.loads(config.read_text()).get("_class_name")
    if kind != "AutoencoderKL":
        raise CheckpointError(f"{config} describes a {kind}, not an AutoencoderKL. Expected: {source}")
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the AutoencoderKL in {path} ({e}). Expected: {source}") from e
    return VAEDecoder(vae, scale, bias, pixel_range)
