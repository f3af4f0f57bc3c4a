"""An image classifier seen through a latent backbone's decoder, for guidance on clean estimates."""

from __future__ import annotations

import torch
from torch import nn


class DecodedClassifier(nn.Module):
    """classifier(decoder(z), sigma): logits of the decoded image of a latent z (DiT's VAE latents).

    Methods that classify the denoiser's clean estimate (EluCD's DDPM branch) guide latent models
    through it: the gradient flows back through the frozen decoder to the latent (training-free
    guidance of latent diffusion, as in Ma et al. 2024's DiT setting and TFG).
    """

    def __init__(self, classifier: nn.Module, decoder: nn.Module):
        super().__init__()
        self.classifier, self.decoder = classifier, decoder

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.decoder(z).to(torch.float32), sigma)
