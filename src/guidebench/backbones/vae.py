"""The VAE decoder stage of latent diffusion (Rombach et al. 2022), as DiT samples with it.

DiT (Peebles & Xie 2023) diffuses the 4 x H/8 x W/8 latents of Stable Diffusion's KL-f8 autoencoder,
fine-tuned as stabilityai/sd-vae-ft-ema (sample_ddp.py's default) or sd-vae-ft-mse, multiplied by
0.18215; sample.py decodes with `vae.decode(z / 0.18215).sample`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from guidebench.checkpoints import CheckpointError, download_advice

VAE_SOURCE = ("https://huggingface.co/stabilityai/{name} (huggingface-cli download stabilityai/{name} "
              "--local-dir {path})")


class VAEDecoder(nn.Module):
    """latents z [B, 4, h, w] (scaled, any float dtype) -> images [B, 3, 8h, 8w] float32 in [-1, 1].

    images = clamp(decode(z / scale), -1, 1). Differentiable (training-free guidance of latent models
    back-propagates through it); the autoencoder's weights are frozen.
    """

    def __init__(self, vae: nn.Module, scale: float = 0.18215):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(scale)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode((latents / self.scale).to(dtype)).sample
        return images.float().clamp(-1, 1)


def load_decoder(path: str | Path, scale: float = 0.18215,
                 config_key: str = "backbone.decoder.path") -> VAEDecoder:
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
    return VAEDecoder(vae, scale)
