"""Tangential CFG, TCFG (Kwon et al. 2025, "TCFG: Tangential Damping Classifier-free Guidance", CVPR)."""

from __future__ import annotations

import torch

from guidebench.guidance.cfg import ClassifierFreeGuidance


class TangentialCFG(ClassifierFreeGuidance):
    """CFG with the unconditional prediction projected onto the first singular direction of [D_c; D_u].

        [D_c; D_u] = U S V^T (per sample, as a 2 x CHW matrix),  D_u' = D_u v1 v1^T,  D = D_u' + scale (D_c - D_u')

    which drops the unconditional component tangential to the pair, as diffusers'
    TangentialClassifierFreeGuidance does (its default formulation). Every CFG key applies.
    """

    name = "tcfg"

    def combine(self, cond, uncond, scale):
        pair = torch.stack([cond, uncond], dim=1).flatten(2).float()
        _, _, vh = torch.linalg.svd(pair, full_matrices=False)
        first = vh[:, :1]
        projected = (uncond.flatten(1).float().unsqueeze(1) @ first.transpose(1, 2) @ first).reshape(uncond.shape)
        return projected + scale * (cond - projected)
