"""Attention-perturbation guidance: PAG (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance", ECCV) and SEG (Hong 2024, "Smoothed Energy Guidance: Guiding Diffusion Models
with Reduced Energy Curvature of Attention", NeurIPS)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from guidebench.backbones.attention import attention_blocks, backbone_network, check_blocks, perturb_attention
from guidebench.denoisers.base import Denoised
from guidebench.guidance.cfg import ClassifierFreeGuidance, rescale_guided

# guidance.blocks=null: these blocks, by (network class, sample resolution)
PAG_BLOCKS = {
    # PAG's official ADM code (KU-CVLAB/Perturbed-Attention-Guidance run/sample_{cond,uncond}_*.sh --drop_layers):
    # the second 16x16 and both 8x8 attention blocks of the encoder and the middle block of ADM-256
    ("UNetModel", 256): ("input_blocks.14.1", "input_blocks.16.1", "input_blocks.17.1", "middle_block.1"),
    # diffusers' PAG pipelines for DiT-style transformers (PixArt-Sigma, SD3) default to the second block "blocks.1"
    ("DiT", 32): ("blocks.1.attn",),
    ("DiT", 64): ("blocks.1.attn",),
    ("DigitsUNet", 8): ("mid_attn",),  # the digits UNet's only attention block (between the 4x4 middle blocks)
}
# SEG-SDXL perturbs the U-Net's middle block (seg_applied_layers=['mid']); elsewhere as PAG
SEG_BLOCKS = {**PAG_BLOCKS, ("UNetModel", 256): ("middle_block.1",)}


class PerturbedAttentionGuidance(ClassifierFreeGuidance):
    """PAG (Ahn et al. 2024): guide away from the prediction whose self-attention maps in `blocks` are the identity,

        D = D_c + s (D_c - D_p)                          (PAG alone, s = `scale`)
        D = D_u + w (D_c - D_u) + s (D_c - D_p)          (PAG with CFG, w = `cfg_scale`, 1 = off)

    D_c = D(x; sigma, y), D_u = D(x; sigma, null), D_p = D(x; sigma, y) with the attention of `blocks`
    perturbed (`backbones.attention`: identity map, so each position keeps its own value). s = 0 and w = 1 is
    the plain model. Per evaluation: D_c (batched with D_u when w != 1), then D_p: NFE 2 without CFG, 3 with.
    PAG alone is CFG's interpolation with D_p in place of D_u, D_p + (1 + s)(D_c - D_p), so the base class
    holds scale = 1 + s, and its keys act on s as on CFG's w: interval / interval_steps (outside them only
    D_c runs), schedule (s_i, with w constant), rescale (on the guided x0, towards D_c's std), channels.
    Needs a null label only when w != 1. blocks: module paths of the backbone's attention blocks
    (`attention_blocks(denoiser)` lists them); None takes PAG_BLOCKS for the backbone, e.g. on ADM-256 the
    four blocks PAG's official code perturbs. Its ADM scripts pass guide_scale 4 to
    eps_p + guide_scale (eps_c - eps_p), i.e. s = 3 here.
    """

    name = "pag"
    mode = "identity"
    default_blocks = PAG_BLOCKS

    def __init__(self, scale: float = 3.0, cfg_scale: float = 1.0, blocks: Sequence[str] | str | None = None,
                 **cfg_keys):
        super().__init__(1 + float(scale), **cfg_keys)
        self.cfg_scale = float(cfg_scale)
        self.blocks = (blocks,) if isinstance(blocks, str) else None if blocks is None else tuple(blocks)
        self.blur_sigma = math.inf

    def blocks_for(self, denoiser) -> tuple[str, ...]:
        """The perturbed blocks: `blocks`, or the method's default for this backbone."""
        if self.blocks is not None:
            return self.blocks
        network = type(backbone_network(denoiser)).__name__
        key = (network, denoiser.img_resolution)
        if key not in self.default_blocks:
            names = ", ".join(attention_blocks(denoiser)) or "none"
            raise ValueError(f"guidance={self.name} has no default blocks for {network} at resolution "
                             f"{denoiser.img_resolution}; set guidance.blocks=[...] from its attention blocks: {names}")
        return self.default_blocks[key]

    def check(self, denoiser, solver=None) -> None:
        if self.cfg_scale != 1:
            super().check(denoiser, solver)
        elif self.channels is not None and self.channels > denoiser.img_channels:
            raise ValueError(f"cfg channels={self.channels} exceeds the backbone's {denoiser.img_channels} channels")
        check_blocks(denoiser, self.blocks_for(denoiser))

    def perturbed(self, denoiser, x, sigma, labels):
        """D_p: the conditional prediction with the attention of `blocks_for(denoiser)` perturbed."""
        with perturb_attention(denoiser, self.blocks_for(denoiser), self.mode, self.blur_sigma):
            return denoiser(x, sigma, labels).x0

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None) -> Denoised:
        s = self.step_scale(step) - 1
        w = self.cfg_scale if self.in_window(step) else 1.0
        if s == 0 and w == 1:
            return denoiser(x, sigma, labels)
        if w == 1:
            cond = denoiser(x, sigma, labels)
            guided = cond.x0
        else:
            cond, uncond = self.predictions(denoiser, x, sigma, labels)
            guided = uncond + w * (cond.x0 - uncond)
        if s != 0:
            guided = guided + s * (cond.x0 - self.perturbed(denoiser, x, sigma, labels))
        if self.rescale > 0:
            guided = rescale_guided(guided, cond.x0, self.rescale)
        if self.channels is not None:
            guided = torch.cat([guided[:, : self.channels], cond.x0[:, self.channels:]], dim=1)
        return cond._replace(x0=guided)


class SmoothedEnergyGuidance(PerturbedAttentionGuidance):
    """SEG (Hong 2024): PAG's rule with D_p from Gaussian-blurred queries in `blocks` (blur_sigma; sigma > 9999 or
    inf: every query is the mean query, SEG-SDXL's "infinite blur"), which smooths the attention's energy
    landscape; the blur equals blurring the attention logits, without forming them (SEG, query blurring).
    D = D_c + s (D_c - D_p), with CFG D_u + w (D_c - D_u) + s (D_c - D_p) (SEG-SDXL pipeline_seg.py), every
    key of `PerturbedAttentionGuidance`. Default blocks: SEG_BLOCKS (ADM-256: the middle block, SEG's 'mid').
    """

    name = "seg"
    mode = "blur"
    default_blocks = SEG_BLOCKS

    def __init__(self, scale: float = 3.0, blur_sigma: float = math.inf, cfg_scale: float = 1.0,
                 blocks: Sequence[str] | str | None = None, **cfg_keys):
        super().__init__(scale, cfg_scale, blocks, **cfg_keys)
        if not blur_sigma > 0:
            raise ValueError(f"guidance.blur_sigma must be > 0 (inf: the mean query), got {blur_sigma}")
        self.blur_sigma = float(blur_sigma)
