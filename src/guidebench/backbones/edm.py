"""EDM's networks (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

`DhariwalUNet` is EDM's re-implementation of the ADM U-Net (Dhariwal & Nichol 2021) used for ImageNet-64;
`EDMPrecond` wraps it in EDM's preconditioning (eq. 7, Table 1 right column) and `iDDPMPrecond` in the
iDDPM one (Table 1 middle column; EDM's form of the ADM baseline). Submodule and parameter names follow
the state dicts inside NVlabs/edm's network pickles, so `load_network` maps a released `.pkl` (read by
`guidebench.backbones.edm_pickle`, which never runs pickled code) onto these classes with a strict load.
EDM's SongUNet (DDPM++/NCSN++ for CIFAR-10/FFHQ/AFHQ) and the VP/VE preconditionings are not
implemented: guidebench benchmarks ImageNet.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from guidebench.backbones.edm_pickle import build_snapshot_network
from guidebench.checkpoints import load_state_dict_checked, require_file
from guidebench.denoisers.preconditioned import EDMDenoiser

RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
RELEASED_FILES = {
    "edm-imagenet-64x64-cond-adm.pkl": RELEASE_URL + "edm-imagenet-64x64-cond-adm.pkl",
    "baseline-imagenet-64x64-cond-adm.pkl": RELEASE_URL + "baseline/baseline-imagenet-64x64-cond-adm.pkl",
}
DEFAULT_SIGMA_RANGE = (0.002, 80.0)  # Karras et al. 2022, sec. 3 / Table 1: sampling range for EDM models


def _uniform_(param: torch.Tensor, fan_in: int, scale: float) -> None:
    """U(-scale / sqrt(fan_in), scale / sqrt(fan_in)) (EDM's kaiming_uniform * sqrt(1/3) for DhariwalUNet)."""
    with torch.no_grad():
        param.uniform_(-1, 1).mul_(scale / math.sqrt(fan_in))


class Linear(nn.Module):
    """x W^T + b with the weights cast to the input's dtype (float16 activations, float32 weights)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_scale: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _uniform_(self.weight, in_features, init_scale)
        if self.bias is not None:
            _uniform_(self.bias, in_features, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Module):
    """Optional 2x resampling with the box filter [1, 1] (nearest up / average down), then a k x k conv.

    kernel = 0 means resampling only (no weight). The filter is the `resample_filter` buffer [1, 1, 2, 2]
    of EDM's pickles, present only on resampling layers.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, init_scale: float = 1.0):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if kernel and bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                _uniform_(p, fan_in, init_scale)
        box = torch.full([1, 1, 2, 2], 0.25)
        self.register_buffer("resample_filter", box if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype).tile([x.shape[1], 1, 1, 1])
            if self.up:
                x = F.conv_transpose2d(x, f * 4, groups=x.shape[1], stride=2)
            else:
                x = F.conv2d(x, f, groups=x.shape[1], stride=2)
        if self.weight is not None:
            x = F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C // 4) groups (EDM's rule, so narrow layers keep >= 4 channels per group)."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(32, num_channels // 4)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """ADM residual block (Dhariwal & Nichol 2021, sec. 3): GN-SiLU-conv, AdaGN, SiLU-dropout-conv, + skip.

    AdaGN: h = SiLU(GN(h) (1 + scale) + shift) with [scale, shift] = affine(emb). With `attention`,
    multi-head self-attention follows with C // 64 heads (none if C < 64). The qkv channels are laid out
    [head, channel, (q, k, v)], as in EDM.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
        self.affine = Linear(emb_channels, 2 * out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_scale=0.0)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1 if out_channels != in_channels else 0, up=up, down=down)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = Conv2d(out_channels, out_channels, 1, init_scale=0.0)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].to(x.dtype).chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = self.proj(a.transpose(1, 2).reshape(b, c, h, w)) + x
        return x


class PositionalEmbedding(nn.Module):
    """[cos(x w_i), sin(x w_i)] with w_i = max_positions^(-i / (C/2)), i < C/2 (Vaswani et al. 2017)."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class DhariwalUNet(nn.Module):
    """ADM U-Net as re-implemented by EDM: F(x, c_noise, y) with one-hot (or soft) labels y [B, label_dim].

    Encoder `enc`: `{R}x{R}_conv`, then per level `{r}x{r}_down` (a resampling UNetBlock, below the top
    level) and `num_blocks` blocks `{r}x{r}_block{i}`; decoder `dec`: `{r}x{r}_in0` (attention) and
    `_in1` at the lowest resolution or `{r}x{r}_up`, then `num_blocks + 1` blocks taking the encoder skips.
    Embedding: emb = SiLU(map_layer1(SiLU(map_layer0(PE(c_noise)))) + map_label(y)).
    Defaults: EDM's ImageNet-64 'adm' configuration; inside EDMPrecond with label_dim=1000 it has
    295,899,267 parameters, the 295.90 M "model capacity" of Karras et al. 2022, Table 7.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, init_scale=0.0) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, init_scale=0.0)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            y = class_labels
            if self.training and self.label_dropout:
                y = y * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(y.dtype)
            emb = emb + self.map_label(y)
        emb = F.silu(emb)

        skips = []
        for blk in self.enc.values():
            x = blk(x, emb) if isinstance(blk, UNetBlock) else blk(x)
            skips.append(x)
        for blk in self.dec.values():
            if x.shape[1] != blk.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def _build_model(model_type: str, **kwargs) -> nn.Module:
    if model_type != "DhariwalUNet":
        raise ValueError(f"model_type={model_type!r} is not implemented in guidebench (only 'DhariwalUNet', "
                         "EDM's ImageNet architecture)")
    return DhariwalUNet(**kwargs)


class _Precond(nn.Module):
    """Shared input handling of EDM's preconditioning wrappers (float32 maths, optional float16 torso)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 out_channels: int, **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                  out_channels=out_channels, label_dim=label_dim, **model_kwargs)

    def _labels(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """[B, label_dim] float32; None -> one all-zero row (EDM's unconditional input)."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def _dtype(self, x: torch.Tensor, force_fp32: bool) -> torch.dtype:
        return torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32


class EDMPrecond(_Precond):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, eq. 7), with Table 1's choices
    c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
    c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4, s_d = sigma_data = 0.5.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.0, sigma_max: float = math.inf, sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        dtype = self._dtype(x, force_fp32)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), self._labels(class_labels, x))
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma)


class iDDPMPrecond(_Precond):
    """iDDPM (Nichol & Dhariwal 2021) as an EDM denoiser (Karras et al. 2022, Table 1, 'iDDPM'):
    D = x - sigma F(x / sqrt(sigma^2 + 1); M - 1 - j)[:, :C], where j indexes the grid u_0 > ... > u_M = 0
    of the cosine schedule, u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1),
    abar_j = sin^2(pi j / (2 M (C_2 + 1))). The net's extra C output channels (learned variance) are unused.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, 2 * img_channels,
                         **model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        u = torch.zeros(M + 1)  # float32 arithmetic, as EDM's grid (also stored in its pickles as `u`)
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer("u", u)

    def alpha_bar(self, j: int) -> torch.Tensor:
        """The cosine schedule's abar_j = sin^2(pi j / (2 M (C_2 + 1))) (Nichol & Dhariwal 2021, eq. 17)."""
        return (0.5 * math.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        dtype = self._dtype(x, force_fp32)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), self._labels(class_labels, x))
        return x - sigma * F_x[:, :self.img_channels].to(torch.float32)

    def round_sigma(self, sigma: torch.Tensor, return_index: bool = False) -> torch.Tensor:
        """Nearest grid level u_j (or its index j), with the distance in float32 via torch.cdist, as EDM."""
        sigma = torch.as_tensor(sigma)
        dist = torch.cdist(sigma.to(self.u.device, torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = dist.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


NETWORKS: dict[str, type[nn.Module]] = {"EDMPrecond": EDMPrecond, "iDDPMPrecond": iDDPMPrecond}


def _source(path: Path) -> str:
    url = RELEASED_FILES.get(path.name)
    return f"{url} (NVlabs/edm README)" if url else f"an NVlabs/edm network pickle (released files: {RELEASE_URL})"


def load_network(checkpoint: str | Path, key: str = "ema", *, config_key: str | None = None,
                 sha256: str | None = None) -> nn.Module:
    """EDMPrecond / iDDPMPrecond from an EDM network pickle, in eval mode without gradients.

    The pickle is decoded by `edm_pickle.build_snapshot_network` (no pickled code is imported or run); the
    network is built from the stored constructor arguments (`_init_args` / `_init_kwargs`) and its weights
    are loaded strictly.
    """
    path = Path(checkpoint).expanduser()
    source = _source(path)
    require_file(path, source=source, sha256=sha256, config_key=config_key)
    net, state_dict = build_snapshot_network(path, key, source, NETWORKS, "EDM")
    load_state_dict_checked(net, state_dict, path=path, source=source)
    return net.eval().requires_grad_(False)


def load_denoiser(checkpoint: str | Path, key: str = "ema", use_fp16: bool | None = None,
                  sha256: str | None = None) -> EDMDenoiser:
    """A released EDM network pickle as D(x; sigma, y).

    use_fp16: run the U-Net torso in float16 on CUDA (None: as stored; EDM's ImageNet-64 model says True).
    Sigma range: the network's own (iDDPM: [u_{M-1}, u_0]); EDMPrecond declares [0, inf), so its
    sampling range (0.002, 80) of Karras et al. 2022 sec. 3 is used instead.
    sha256: if given, the pickle must have this hash.
    """
    net = load_network(checkpoint, key, config_key="backbone.denoiser.checkpoint", sha256=sha256)
    if use_fp16 is not None:
        net.use_fp16 = use_fp16
    lo, hi = net.sigma_min, net.sigma_max
    return EDMDenoiser(net, img_channels=net.img_channels, img_resolution=net.img_resolution,
                       num_classes=net.label_dim, sigma_min=lo if lo > 0 else DEFAULT_SIGMA_RANGE[0],
                       sigma_max=hi if math.isfinite(hi) else DEFAULT_SIGMA_RANGE[1])
