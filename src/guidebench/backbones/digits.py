"""The digits diffusion model: a compact class-conditional UNet on 8x8x1 images.

A miniature of ADM (Dhariwal & Nichol 2021): residual blocks whose GroupNorm is modulated by the
timestep + class embedding (AdaGN, "scale-shift norm", sec. 3), one 2x downsampling (8x8 -> 4x4),
skip connections, optionally ADM's self-attention block between the two 4x4 middle blocks (as in its
`middle_block`; what PAG/SEG perturb on digits), an eps-prediction head (Ho et al. 2020, eq. 14) and the
cosine schedule with T = 1000 (Nichol & Dhariwal 2021, eq. 17). The class embedding has num_classes + 1
rows: the last is the null label of classifier-free guidance (Ho & Salimans 2022), trained by label dropout.
Trained by `guidebench-train task=diffusion` (guidebench.training.diffusion).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from guidebench.backbones.adm import AttentionBlock
from guidebench.denoisers.discrete_vp import DiscreteVPDenoiser, betas_for_schedule
from guidebench.training.checkpoint import load_trained

NUM_TIMESTEPS = 1000
BETA_SCHEDULE = "cosine"


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(16, channels // 4), channels)


class ResBlock(nn.Module):
    """GN-SiLU-conv, AdaGN with the embedding (h = GN(h) (1 + scale) + shift), SiLU-dropout-conv, + skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """net(x_t, t, y) -> eps for 8x8 images: 8x8 blocks, 4x4 blocks, back up with skip connections.

    y: [B] int64 in 0..num_classes (num_classes = null label) or None (all null).
    attention_heads: heads of the self-attention block `mid_attn` between the two middle blocks (0: none,
    the layout of checkpoints saved without this key).
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, channel_mult: int = 2, num_res_blocks: int = 2,
                 emb_dim: int = 256, num_classes: int = 10, dropout: float = 0.0, attention_heads: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.channels = channels
        c1, c2 = channels, channels * channel_mult
        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down8 = nn.ModuleList([ResBlock(c1, c1, emb_dim, dropout) for _ in range(num_res_blocks)])
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down4 = nn.ModuleList([ResBlock(c2, c2, emb_dim, dropout) for _ in range(num_res_blocks)])
        self.mid = nn.ModuleList([ResBlock(c2, c2, emb_dim, dropout) for _ in range(2)])
        self.up4 = nn.ModuleList([ResBlock(2 * c2 if i == 0 else c2, c2, emb_dim, dropout)
                                  for i in range(num_res_blocks)])
        self.upsample = nn.Conv2d(c2, c1, 3, padding=1)
        self.up8 = nn.ModuleList([ResBlock(2 * c1 if i == 0 else c1, c1, emb_dim, dropout)
                                  for i in range(num_res_blocks)])
        self.norm_out = group_norm(c1)
        self.conv_out = nn.Conv2d(c1, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # built last, so that the seeded initial weights of every other layer are those of the model without it
        self.mid_attn = AttentionBlock(c2, attention_heads) if attention_heads else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.int64, device=x.device)
        emb = self.time_embed(timestep_embedding(t, self.channels)) + self.label_embed(y)
        h8 = self.conv_in(x)
        for block in self.down8:
            h8 = block(h8, emb)
        h4 = self.downsample(h8)
        for block in self.down4:
            h4 = block(h4, emb)
        h = self.mid[0](h4, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid[1](h, emb)
        h = torch.cat([h, h4], dim=1)
        for block in self.up4:
            h = block(h, emb)
        h = self.upsample(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = torch.cat([h, h8], dim=1)
        for block in self.up8:
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class _NullLabel(nn.Module):
    """The conditional net with every label replaced by the null label: the unconditional model."""

    def __init__(self, net: DigitsUNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, t, None)


def load_unet(checkpoint: str | Path) -> DigitsUNet:
    """The (EMA) DigitsUNet stored by `guidebench-train task=diffusion`, in eval mode."""
    return load_trained(checkpoint, "diffusion", DigitsUNet, config_key="backbone.denoiser.checkpoint")


def make_denoiser(net: DigitsUNet, conditional: bool = True, clip_x0: bool = True) -> DiscreteVPDenoiser:
    """Wrap a DigitsUNet as a sigma-space denoiser; conditional=False always feeds the null label.

    clip_x0 clamps x0 to [-1, 1] as ADM's clip_denoised: near t = T of the cosine schedule
    (sigma ~ 2e4) x0 = x - sigma eps amplifies the network's eps error by sigma.
    """
    return DiscreteVPDenoiser(
        net if conditional else _NullLabel(net),
        betas_for_schedule(BETA_SCHEDULE, NUM_TIMESTEPS),
        img_channels=1,
        img_resolution=8,
        num_classes=net.num_classes,
        null_label=net.num_classes if conditional else None,
        parameterisation="eps",
        clip_x0=clip_x0,
    )


def load_denoiser(checkpoint: str | Path, conditional: bool = True, clip_x0: bool = True) -> DiscreteVPDenoiser:
    """The digits diffusion model as D(x; sigma, y).

    conditional=False is the unconditional model (the analogue of ADM's 256x256_diffusion_uncond.pt):
    the net always sees the null label and `labels` are ignored.
    """
    return make_denoiser(load_unet(checkpoint), conditional, clip_x0)
