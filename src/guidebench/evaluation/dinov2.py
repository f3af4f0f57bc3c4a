"""DINOv2 ViT-L/14 features for FD-DINOv2 (Stein et al. 2023; EDM2, Karras et al. 2024), offline.

EDM2's `calculate_metrics.py` (DINOv2Detector, resize_mode='torch') embeds an image as the final-LayerNorm
CLS token (1024-d) of torch.hub's `dinov2_vitl14` on a 224x224 input:

    x = bicubic_antialias_resize(uint8 image as float32, 224) / 255;  x = (x - mean) / std  (ImageNet mean/std)

The hub network keeps its 37x37 position embedding (518 px) and interpolates it for every 224 px input
(bicubic, no antialias, scale factor (16 + 0.1) / 37). Here the network is timm's VisionTransformer at
224 px, built from the released weights file `dinov2_vitl14_pretrain.pth` with that interpolation done
once at load time (same operation, same numbers), `mask_token` (training only) dropped.
FD-DINOv2 is then the Frechet distance (adm_metrics.frechet_distance) of these features.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from guidebench.checkpoints import load_state_dict_checked, load_torch_file, sha256_file

FAMILY = "dinov2-vitl14"
URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
CONFIG_KEY = "metrics.extractors.dinov2.checkpoint"
VIT_L14 = dict(embed_dim=1024, depth=24, num_heads=16)
INPUT_SIZE = 224
PATCH_SIZE = 14
INTERPOLATE_OFFSET = 0.1
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def build_vit(embed_dim: int, depth: int, num_heads: int) -> torch.nn.Module:
    """DINOv2's ViT at 224 px as a timm VisionTransformer returning the normed CLS token."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=INPUT_SIZE, patch_size=PATCH_SIZE, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=1.0, num_classes=0,
                             global_pool="token", weight_init="skip")


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's `interpolate_pos_encoding` for a grid x grid patch input: the patch part of the [1, 1 + M^2, D]
    embedding resized bicubically (no antialias) by the scale factor (grid + 0.1) / M; CLS part unchanged."""
    cls, patches = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    m, dim = math.isqrt(patches.shape[1]), patches.shape[2]
    if m * m != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patches is not a square grid")
    scale = (grid + INTERPOLATE_OFFSET) / m
    resized = torch.nn.functional.interpolate(patches.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                                              antialias=False, scale_factor=(scale, scale))
    if resized.shape[-2:] != (grid, grid):
        raise ValueError(f"interpolated grid {tuple(resized.shape[-2:])} != {(grid, grid)}")
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1).to(pos_embed.dtype)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released DINOv2 state dict -> the 224 px timm model's (same parameter names but mask_token, pos_embed)."""
    out = {k: v for k, v in state_dict.items() if k != "mask_token"}
    out["pos_embed"] = interpolate_pos_embed(state_dict["pos_embed"], INPUT_SIZE // PATCH_SIZE)
    return out


class DINOv2Features(torch.nn.Module):
    """uint8 images [N, 3, H, W] -> {"pool": [N, D]} DINOv2 CLS features, EDM2's preprocessing.

    The feature is called "pool" (the image's pooled embedding) so the same suite code computes FD, and
    precision/recall or KID if wanted, in this space."""

    family = FAMILY

    def __init__(self, vit: torch.nn.Module, name: str):
        super().__init__()
        self.vit = vit
        self.name = name
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = torch.nn.functional.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic",
                                            antialias=True)
        x = (x / 255 - self.mean) / self.std
        return {"pool": self.vit(x).float()}


def load_dinov2(checkpoint: str | Path, *, sha256: str | None = None,
                device: str | torch.device = "cpu") -> DINOv2Features:
    """DINOv2 ViT-L/14 from the released `dinov2_vitl14_pretrain.pth` (a local file; nothing is downloaded)."""
    source = f"{URL} (about 1.2 GB)"
    state_dict = load_torch_file(checkpoint, source=source, sha256=sha256, config_key=CONFIG_KEY)
    vit = build_vit(**VIT_L14)
    load_state_dict_checked(vit, convert_state_dict(state_dict), path=checkpoint, source=source)
    name = f"{FAMILY}:{(sha256 or sha256_file(checkpoint))[:8]}"
    return DINOv2Features(vit, name).to(device).eval()
