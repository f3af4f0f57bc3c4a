"""Guidance classifiers for the digits benchmark, both called as classifier(x, sigma) -> logits [B, 10].

NoisyDigitsClassifier: noise-aware, as ADM's classifier (Dhariwal & Nichol 2021, sec. 4): it sees
    x in sigma space, scales it to the VP input x_t = x / sqrt(1 + sigma^2) (c_in of Karras et al. 2022,
    Table 1) and is conditioned on a sinusoidal embedding of 100 ln(max(sigma, 1e-3)) through AdaGN blocks;
    trained on train-split images noised at t ~ U{0..999} of the diffusion model's cosine schedule.
CleanDigitsClassifier: an "off-the-shelf" classifier of clean images (a plain BatchNorm ReLU CNN, like the
    ImageNet ResNets it stands in for), trained on clean train-split images only; it ignores sigma, as
    training-free guidance methods assume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from guidebench.backbones.digits import ResBlock, group_norm, timestep_embedding
from guidebench.classifiers.softplus import swap_relu_for_softplus
from guidebench.training.checkpoint import load_trained


def _sigma_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])


class NoisyDigitsClassifier(nn.Module):
    """p(y | x; sigma): c_in scaling, 8x8 and 4x4 AdaGN residual blocks, mean pooling, linear head."""

    def __init__(self, in_channels: int = 1, channels: int = 32, channel_mult: int = 2, num_res_blocks: int = 2,
                 emb_dim: int = 128, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.channels = channels
        c1, c2 = channels, channels * channel_mult
        self.sigma_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.blocks8 = nn.ModuleList([ResBlock(c1, c1, emb_dim, dropout) for _ in range(num_res_blocks)])
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.blocks4 = nn.ModuleList([ResBlock(c2, c2, emb_dim, dropout) for _ in range(num_res_blocks)])
        self.norm_out = group_norm(c2)
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = _sigma_batch(sigma, x)
        emb = self.sigma_embed(timestep_embedding(100 * sigma.clamp_min(1e-3).log(), self.channels))
        h = self.conv_in(x / (1 + sigma.square()).sqrt().reshape(-1, 1, 1, 1))
        for block in self.blocks8:
            h = block(h, emb)
        h = self.downsample(h)
        for block in self.blocks4:
            h = block(h, emb)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


class CleanDigitsClassifier(nn.Module):
    """p(y | x0) for clean images in [-1, 1]: (conv-BN-ReLU) x2, max-pool, (conv-BN-ReLU) x2, mean pool, linear."""

    def __init__(self, in_channels: int = 1, channels: int = 32, num_classes: int = 10, dropout: float = 0.1):
        super().__init__()

        def unit(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        c1, c2 = channels, 2 * channels
        self.features = nn.Sequential(*unit(in_channels, c1), *unit(c1, c1), nn.MaxPool2d(2),
                                      *unit(c1, c2), *unit(c2, c2))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        return self.head(self.dropout(self.features(x).mean(dim=(2, 3))))


def load_noisy_classifier(checkpoint: str | Path) -> NoisyDigitsClassifier:
    """The noise-aware classifier made by `guidebench-train task=noisy_classifier` (eval mode, frozen)."""
    return load_trained(checkpoint, "noisy_classifier", NoisyDigitsClassifier, config_key="classifier.checkpoint")


def load_clean_classifier(checkpoint: str | Path, softplus_beta: float | None = None) -> CleanDigitsClassifier:
    """The clean classifier made by `guidebench-train task=clean_classifier` (eval mode, frozen).

    softplus_beta: EluCD's ReLU -> Softplus(beta) swap of every ReLU (swap_relu_for_softplus); None keeps ReLU.
    """
    net = load_trained(checkpoint, "clean_classifier", CleanDigitsClassifier, config_key="classifier.checkpoint")
    return swap_relu_for_softplus(net, softplus_beta).eval()

