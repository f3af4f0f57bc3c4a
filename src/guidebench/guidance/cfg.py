"""Classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

import torch

from guidebench.denoisers.base import Denoised
from guidebench.guidance.base import Guidance


class ClassifierFreeGuidance(Guidance):
    """Ho & Salimans 2022, eq. 6, in the EDM/DiT convention.

        D_guided = D(x; sigma, null) + scale * (D(x; sigma, y) - D(x; sigma, null))

    `scale` = 1 is the conditional model, 0 the unconditional one. Ho & Salimans write
    eps~ = (1 + w) eps(y) - w eps(null), i.e. w = scale - 1 (their w = 0 is unguided). The rule is
    affine, so guiding x0 and guiding eps give the same step. Both halves run as ONE batched forward.
    With learned variance the conditional half's variance is kept (as ADM/DiT sampling do).

    channels: guide only the first `channels` output channels and take the others from the
    conditional prediction. DiT's released sampler does this with channels=3 on its 4-channel
    latents (Peebles & Xie 2023; facebookresearch/DiT models.py `forward_with_cfg`, used by
    sample.py / sample_ddp.py), so its published FIDs need channels=3; None guides all channels.
    """

    name = "cfg"

    def __init__(self, scale: float = 1.0, channels: int | None = None):
        if channels is not None and channels < 1:
            raise ValueError(f"cfg channels must be a positive channel count or None (all), got {channels}")
        self.scale = float(scale)
        self.channels = channels

    @property
    def w(self) -> float:
        """Ho & Salimans' guidance strength w = scale - 1."""
        return self.scale - 1

    def check(self, denoiser, solver=None) -> None:
        if getattr(denoiser, "null_label", None) is None:
            raise ValueError(
                f"guidance=cfg needs a conditional backbone with a null label; {type(denoiser).__name__} has none "
                "(use guidance=classifier for an unconditional model)"
            )
        if self.channels is not None and self.channels > denoiser.img_channels:
            raise ValueError(f"cfg channels={self.channels} exceeds the backbone's {denoiser.img_channels} channels")

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None) -> Denoised:
        if self.scale == 1:
            return denoiser(x, sigma, labels)
        null = torch.full_like(labels, denoiser.null_label)
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        cond, uncond = out.x0.chunk(2)
        var_frac = None if out.var_frac is None else out.var_frac.chunk(2)[0]
        guided = uncond + self.scale * (cond - uncond)
        if self.channels is not None:
            guided = torch.cat([guided[:, : self.channels], cond[:, self.channels :]], dim=1)
        return Denoised(guided, var_frac)
