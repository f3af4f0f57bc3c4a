"""ADM's noise-aware ImageNet classifiers (Dhariwal & Nichol 2021, sec. 4.1) in sigma space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from guidebench.backbones.adm import (CLASSIFIER_DEFAULTS, DIFFUSION_DEFAULTS, EncoderUNetModel, checkpoint_source,
                                      complete_flags, create_classifier, load_weights, resolve_dtype)
from guidebench.checkpoints import require_file
from guidebench.denoisers.discrete_vp import betas_for_schedule


class ADMClassifier(nn.Module):
    """p_phi(y | x_t, t) as classifier(x, sigma) -> logits, with x = x0 + sigma n (EDM coordinates).

    The network sees the VP sample x_t = x / sqrt(1 + sigma^2) (Karras et al. 2022, Table 1) and the
    step t of its own T-step schedule whose sigma_t = sqrt((1 - abar_t) / abar_t) is nearest to sigma
    in log space. On the sigma levels of a (respaced) ADM schedule this is the ORIGINAL step index that
    guided-diffusion's respaced sampler hands to cond_fn. Gradients flow to x; logits are float32.
    """

    def __init__(self, net: EncoderUNetModel, betas: torch.Tensor, timestep_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.timestep_scale = timestep_scale
        abar = torch.cumprod(1 - betas.to(torch.float64), dim=0)
        self.register_buffer("sigmas", ((1 - abar) / abar).sqrt(), persistent=False)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the training step nearest to sigma in log space, int64 [B]."""
        dist = (sigma.to(torch.float64).clamp_min(1e-20).log()[:, None] - self.sigmas.log()[None, :]).abs()
        return dist.argmin(dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        t = self.sigma_to_t(sigma)
        x_t = x.to(torch.float32) * (1 + sigma**2).rsqrt().to(torch.float32).reshape(-1, 1, 1, 1)
        return self.net(x_t, t * self.timestep_scale if self.timestep_scale != 1 else t).to(torch.float32)


def load_classifier(checkpoint: str | Path, *, dtype: str | None = None, sha256: str | None = None,
                    **flags: Any) -> ADMClassifier:
    """A released ADM classifier (e.g. 256x256_classifier.pt) as classifier(x, sigma) -> logits.

    flags: its CLASSIFIER_FLAGS (classifier_width, classifier_depth, ...) plus the diffusion flags
           of the model it guides (noise_schedule, diffusion_steps): guided-diffusion feeds the
           classifier that model's step indices.
    dtype: compute dtype of the torso (float32 / float16 / bfloat16); default float16 if
           classifier_use_fp16 else float32;
    sha256: if given, the file must have this hash.
    """
    f = complete_flags(flags, {**CLASSIFIER_DEFAULTS, **DIFFUSION_DEFAULTS}, "classifier")
    compute_dtype = resolve_dtype(dtype, f["classifier_use_fp16"])
    require_file(checkpoint, source=checkpoint_source(checkpoint), sha256=sha256, config_key="classifier.checkpoint")
    net = create_classifier(f)
    load_weights(net, checkpoint, "classifier.checkpoint")
    net.set_dtype(compute_dtype)
    net.requires_grad_(False)
    steps = int(f["diffusion_steps"])
    return ADMClassifier(net, betas_for_schedule(f["noise_schedule"], steps),
                         1000 / steps if f["rescale_timesteps"] else 1.0)
