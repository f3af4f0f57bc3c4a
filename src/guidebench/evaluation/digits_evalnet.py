"""The digits benchmark's evaluation network: its Inception-v3 (features for FID/precision/recall, logits for IS).

A plain ReLU CNN without normalisation layers, an architecture unlike every model it judges:
conv5x5(32)-ReLU, conv3x3(64)-ReLU, max-pool to 4x4, conv3x3(128)-ReLU, flatten, linear(128)-ReLU
(= `features`, D = 128, the analogue of Inception's 2048-d pool3), dropout, linear(10) (= `logits`).
Trained by `guidebench-train task=evalnet` on the heldout split only, with +-1 pixel shifts and its own
seed, so that it judges the generators without having seen their training images; its accuracy is
measured on the train split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from guidebench.training.checkpoint import load_trained


class DigitsEvalNet(nn.Module):
    """images uint8 [B, 1 or 3, 8, 8] (NCHW, 0..255) -> {features [B, D], logits [B, 10]}.

    Three-channel input (as torch-fidelity hands over) is averaged to grey.
    """

    def __init__(self, channels: int = 32, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 5, padding=2)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * channels, 4 * channels, 3, padding=1)
        self.fc = nn.Linear(4 * channels * 16, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) \
                or tuple(images.shape[2:]) != (8, 8):
            raise ValueError(f"DigitsEvalNet expects uint8 images [B, 1 or 3, 8, 8]; got {images.dtype} "
                             f"{list(images.shape)}")
        x = images.to(torch.float32).mean(dim=1, keepdim=True) / 127.5 - 1
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        features = F.relu(self.fc(F.relu(self.conv3(h)).flatten(1)))
        return {"features": features, "logits": self.head(self.dropout(features))}


def load_evalnet(checkpoint: str | Path) -> DigitsEvalNet:
    """The evaluation network made by `guidebench-train task=evalnet` (eval mode, frozen)."""
    return load_trained(checkpoint, "evalnet", DigitsEvalNet, config_key="metrics.extractors.evalnet.checkpoint")
