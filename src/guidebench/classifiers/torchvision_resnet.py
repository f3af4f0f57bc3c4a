"""The off-the-shelf torchvision ResNets that EluCD guides with (Ma et al., ICLR 2024), loaded as its code loads them.

EluCD (DDPM/scripts/classifier_sample.py, EDM/generate.py) builds `torchvision.models.resnet101()` (or
resnet50) without weights, loads torchvision's IMAGENET1K_V2 file strictly (its
pretrained_models/resnet{101,50}_weight_V2.pth), calls eval() and optionally swaps ReLU -> Softplus(beta).
The classifier sees the diffusion image as is: values in [-1, 1] at the diffusion resolution, with no resize,
no ImageNet mean / std normalisation and no sigma (timm_classifier applies torchvision's evaluation
preprocessing instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torchvision
from torch import nn

from guidebench.checkpoints import CheckpointError, load_state_dict_checked, load_torch_file, require_file
from guidebench.classifiers.softplus import swap_relu_for_softplus

WEIGHTS = {
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V2", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"),
    "resnet101": ("ResNet101_Weights.IMAGENET1K_V2", "https://download.pytorch.org/models/resnet101-cd907fc2.pth"),
}


class TorchvisionClassifier(nn.Module):
    """classifier(x, sigma) -> logits [B, K] of an ImageNet torchvision net on x as is (float32); sigma is ignored.

    The net is made float32 and frozen, its ReLUs are swapped for Softplus(softplus_beta)
    (swap_relu_for_softplus; None or inf: plain ReLU) and it is put in eval mode (BatchNorm running statistics).
    """

    def __init__(self, net: nn.Module, softplus_beta: float | None = None):
        super().__init__()
        self.net = swap_relu_for_softplus(net.float().requires_grad_(False), softplus_beta)
        self.eval()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        return self.net(x.to(torch.float32))


def load_weights(net: nn.Module, checkpoint: str | Path, source: str) -> None:
    """Strict load of a torchvision state dict into `net`; errors name the file, what differs and `source`.

    Files that predate BatchNorm's num_batches_tracked buffer (torchvision's V1 weights) lack it; torch's
    strict load fills it in for them, as here (it only matters for training with momentum=None).
    """
    state = load_torch_file(checkpoint, source=source, config_key="classifier.checkpoint")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{checkpoint} holds a {type(state).__name__}, not a state dict. Expected: {source}")
    counters = {k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked") and k not in state}
    load_state_dict_checked(net, {**state, **counters}, path=checkpoint, source=source)


def load_classifier(arch: str = "resnet101", *, checkpoint: str | Path,
                    softplus_beta: float | None = None) -> TorchvisionClassifier:
    """torchvision.models.<arch>() with the local IMAGENET1K_V2 weights `checkpoint` (never downloads).

    arch: resnet50 | resnet101 (EluCD's --classifier_type; its EDM script always uses resnet101);
    softplus_beta: EluCD's ReLU -> Softplus(beta) swap; None (or inf, EluCD's default) keeps ReLU.
    """
    if arch not in WEIGHTS:
        raise ValueError(f"classifier.arch {arch!r} is not one of EluCD's torchvision classifiers {sorted(WEIGHTS)}")
    enum, url = WEIGHTS[arch]
    source = f"torchvision {arch} {enum}: {url}"
    require_file(checkpoint, source=source, config_key="classifier.checkpoint")
    net = getattr(torchvision.models, arch)()
    load_weights(net, checkpoint, source)
    return TorchvisionClassifier(net, softplus_beta)
