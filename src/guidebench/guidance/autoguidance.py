"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS)."""

from __future__ import annotations

import torch

from guidebench.denoisers.base import Denoised
from guidebench.guidance.cfg import ClassifierFreeGuidance


class AutoGuidance(ClassifierFreeGuidance):
    """Guidance by a weaker model, as one interpolation: D = D_0 + scale (D_1 - D_0) (Karras et al. 2024, sec. 3),

    D_1 the main model and D_0 = `guide`, a weaker model of the same task and conditioning (smaller and/or
    trained shorter; EDM2: the XS model at an earlier training snapshot), both given the same label
    (EDM2 generate_images.py: `gnet(x, t, labels).lerp(net(x, t, labels), guidance)`). scale = 1 is the
    main model alone. Two separate forwards per guided evaluation. Every CFG key (interval, schedule,
    rescale, channels) applies; guiding with an unconditional guide (num_classes 0: EDM2's CFG rows, whose
    guide is a separately trained unconditional net) is the same formula.
    """

    name = "autoguidance"

    def __init__(self, guide, scale: float = 2.0, **cfg_keys):
        super().__init__(scale, **cfg_keys)
        self.guide = guide

    def check(self, denoiser, solver=None) -> None:
        if self.guide is None:
            raise ValueError("guidance=autoguidance needs a guide model (guidance.guide: a denoiser config)")
        for key in ("img_channels", "img_resolution", "num_classes"):
            if key == "num_classes" and self.guide.num_classes == 0:  # an unconditional guide: EDM2's CFG
                continue
            if getattr(self.guide, key) != getattr(denoiser, key):
                raise ValueError(f"guidance=autoguidance: the guide's {key} is {getattr(self.guide, key)} but the "
                                 f"backbone's is {getattr(denoiser, key)}; the guide must be a model of the same task")
        if self.channels is not None and self.channels > denoiser.img_channels:
            raise ValueError(f"cfg channels={self.channels} exceeds the backbone's {denoiser.img_channels} channels")

    def predictions(self, denoiser, x, sigma, labels) -> tuple[Denoised, torch.Tensor]:
        return denoiser(x, sigma, labels), self.guide(x, sigma, labels).x0
