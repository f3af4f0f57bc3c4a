"""EluCD's ReLU -> Softplus(beta) swap for off-the-shelf classifiers (Ma et al., ICLR 2024).

A ReLU classifier is piecewise linear in its input, so its input gradient, the guidance direction, is
piecewise constant and jumps wherever a unit changes sign. EluCD smooths a pre-trained classifier by
replacing its ReLUs with Softplus(beta)(x) = log(1 + exp(beta x)) / beta, which tends to ReLU as
beta -> inf, keeps the weights and gives smooth gradients (the paper's Softplus pre-conditioning).
"""

from __future__ import annotations

import math

from torch import nn
from torchvision.models.resnet import BasicBlock


def swap_relu_for_softplus(net: nn.Module, beta: float | None) -> nn.Module:
    """Replace, in place, the nn.ReLU modules of `net` by nn.Softplus(beta=beta) (torch's threshold 20); returns net.

    EluCD's rule (DDPM/scripts/classifier_sample.py and EDM/generate.py): the top-level ReLU children and,
    inside layer1..layer4, the ReLU children of each torchvision Bottleneck. torchvision's Bottleneck owns
    ONE `relu` module that it calls three times (after bn1, bn2 and the residual add), so every activation
    of resnet50/101 becomes Softplus; the ReLUs of BasicBlocks (resnet18/34) are kept. Here: every ReLU
    anywhere in `net` except inside a torchvision BasicBlock, which is that rule on torchvision ResNets and
    swaps every ReLU of any other network. beta None or inf: no swap (EluCD's default softplus_beta = inf).
    """
    if beta is None or beta == math.inf:
        return net
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"classifier.softplus_beta must be > 0 (or null / inf for plain ReLU), got {beta}")
    _swap(net, beta)
    return net


def _swap(module: nn.Module, beta: float) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus(beta=beta))
        elif not isinstance(child, BasicBlock):
            _swap(child, beta)
