"""Continuous-sigma networks that already compute D(x; sigma, y) (EDM's preconditioned nets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guidebench.denoisers.base import Denoised


class EDMDenoiser(torch.nn.Module):
    """Adapter for a network `net(x, sigma, class_labels) -> D` with one-hot labels (NVlabs/edm).

    The network owns its preconditioning (Karras et al. 2022, eq. 7:
    D = c_skip x + c_out F(c_in x, c_noise)); this adapter only turns int64 labels into the one-hot
    rows EDM expects (None -> the net's unconditional path) and declares the sigma range.
    """

    def __init__(self, net: torch.nn.Module, *, img_channels: int, img_resolution: int, num_classes: int = 0,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.num_classes = num_classes
        self.null_label = None
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        round_sigma = getattr(self.net, "round_sigma", None)
        return round_sigma(sigma) if round_sigma is not None else torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Denoised:
        onehot = None
        if labels is not None and self.num_classes > 0:
            onehot = F.one_hot(labels, self.num_classes).to(torch.float32)
        return Denoised(self.net(x.to(torch.float32), sigma.to(torch.float32), onehot).to(torch.float32))
