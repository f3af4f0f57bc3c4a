"""EDM2's networks (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR).

`UNet` is EDM2's magnitude-preserving U-Net (config G, Fig. 21) and `Precond` its EDM preconditioning
(Karras et al. 2022, eq. 7) with sigma_data = 0.5. Submodule and parameter names follow the state dicts inside
NVlabs/edm2's network pickles, so `load_network` maps a released `.pkl` (read by `guidebench.backbones.edm_pickle`,
which never runs pickled code) onto these classes with a strict load. Only the sampling (eval-mode) forward is
implemented: the training-time forced weight normalisation (eq. 66), dropout and the uncertainty head `logvar_*`
(eq. 21; kept for the strict load) do not take part in sampling.

ImageNet-512 models diffuse the latents of Stable Diffusion's VAE sd-vae-ft-mse, whitened per channel
(training/encoders.py StabilityVAEEncoder); `load_decoder` builds that decoding on `guidebench.backbones.vae`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from guidebench.backbones import vae
from guidebench.backbones.edm_pickle import build_snapshot_network
from guidebench.checkpoints import load_state_dict_checked, require_file
from guidebench.denoisers.preconditioned import EDMDenoiser

RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"
SIGMA_RANGE = (0.002, 80.0)  # generate_images.py edm_sampler defaults (Karras et al. 2022, sec. 3)
# StabilityVAEEncoder defaults, which every released ImageNet-512 pickle records: statistics of the raw
# sd-vae-ft-mse latents of ImageNet-512 and the whitened target N(0, 0.5^2).
VAE_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
VAE_RAW_STD = (4.17, 4.62, 3.71, 3.28)


def normalize(x: torch.Tensor, dim: Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(N)) over `dim` (default: all but the first), N the number of elements reduced:
    unit root-mean-square magnitude (Karras et al. 2024, eq. 66's normalisation); the norm in float32."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f: Sequence[float], mode: str) -> torch.Tensor:
    """2x down (stride-2 depthwise conv) or up (transposed, gain 4) with the separable filter f f^T / sum(f)^2,
    or x itself for mode 'keep'. EDM2's f = [1, 1]: 2x2 average pooling / nearest-neighbour upsampling."""
    if mode == "keep":
        return x
    f = np.float32(f)
    f = torch.as_tensor(np.outer(f, f) / f.sum() ** 2, dtype=x.dtype, device=x.device)
    pad = (len(f) - 1) // 2
    f = f.tile([x.shape[1], 1, 1, 1])
    if mode == "down":
        return F.conv2d(x, f, groups=x.shape[1], stride=2, padding=pad)
    if mode == "up":
        return F.conv_transpose2d(x, f * 4, groups=x.shape[1], stride=2, padding=pad)
    raise ValueError(f"resample mode {mode!r}; expected 'keep', 'down' or 'up'")


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU, SiLU(x) / 0.596 (Karras et al. 2024, eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving sum ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (Karras et al. 2024, eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (Karras et al. 2024, eq. 103): [w_a a, w_b b] with
    w_a = C (1 - t) / sqrt(N_a), w_b = C t / sqrt(N_b), C = sqrt((N_a + N_b) / ((1 - t)^2 + t^2))."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([(c / math.sqrt(na) * (1 - t)) * a, (c / math.sqrt(nb) * t) * b], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(2 pi (f_i x + p_i)) (Karras et al. 2024, eq. 75);
    the buffers hold 2 pi f_i (f_i ~ N(0, bandwidth^2)) and 2 pi p_i (p_i ~ U(0, 1)), computed in float32."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or linear layer (kernel []) (Karras et al. 2024, eq. 47):
    the weight is normalised per output channel to unit magnitude and scaled by gain / sqrt(fan_in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """Encoder / decoder block (Karras et al. 2024, Fig. 21), with the residual branch
    y = conv_res1(mp_silu(conv_res0(mp_silu(x)) * (1 + emb_linear(emb; gain = emb_gain)))),
    x = mp_sum(x, y, res_balance), then optional self-attention with pixel-normalised q, k, v,
    x = mp_sum(x, attn, attn_balance), and activations clipped to [-clip_act, clip_act].
    'enc' blocks resample, project (conv_skip) and pixel-normalise x first; 'dec' blocks project x only
    for the sum.
    """

    def __init__(self,
                 in_channels: int,                   # input channels
                 out_channels: int,                  # output channels
                 emb_channels: int,                  # embedding channels
                 flavor: str = "enc",                # 'enc' or 'dec'
                 resample_mode: str = "keep",        # 'keep', 'up' or 'down'
                 resample_filter: Sequence[float] = (1, 1),  # separable resampling filter
                 attention: bool = False,            # self-attention after the residual branch
                 channels_per_head: int = 64,        # attention heads = out_channels // channels_per_head
                 dropout: float = 0,                 # training only (recorded in EDM2-M..XXL's pickles)
                 res_balance: float = 0.3,           # t of the residual mp_sum
                 attn_balance: float = 0.3,          # t of the attention mp_sum
                 clip_act: float | None = 256):      # output clipping; None: none
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=[1])

        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(self.conv_res0(mp_silu(x)) * c[:, :, None, None].to(x.dtype))
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            n, _, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(qkv, dim=[2]).unbind(3)  # [N, heads, C_head, HW] each
            a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = self.attn_proj(torch.einsum("nhqk,nhck->nhcq", a, v).reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2's U-Net F(x, c_noise, y) (Karras et al. 2024, Fig. 21) with one-hot labels y [B, label_dim].

    emb = mp_silu(mp_sum(emb_noise(MPFourier(c_noise)), emb_label(sqrt(label_dim) y), label_balance));
    the input gets a constant ones channel; encoder `{r}x{r}_conv`, `{r}x{r}_down`, `{r}x{r}_block{i}`;
    decoder `{r}x{r}_in0` (attention), `_in1` at the lowest resolution or `{r}x{r}_up`, then `num_blocks + 1`
    blocks, each after an mp_cat of a skip (concat_balance); out_conv with the learned gain out_gain.
    Defaults: EDM2-S (model_channels 192: 280 M parameters, Table 2).
    """

    def __init__(self,
                 img_resolution: int,                # input resolution (latents: 64 for ImageNet-512)
                 img_channels: int,                  # input / output channels
                 label_dim: int,                     # classes; 0 = unconditional
                 model_channels: int = 192,          # channel multiplier: XS 128, S 192, M 256, L 320, XL 384, XXL 448
                 channel_mult: Sequence[int] = (1, 2, 3, 4),  # per-resolution channel multipliers
                 channel_mult_noise: int | None = None,  # noise embedding width / model_channels (None: mult[0])
                 channel_mult_emb: int | None = None,    # final embedding width / model_channels (None: max(mult))
                 num_blocks: int = 3,                # blocks per resolution
                 attn_resolutions: Sequence[int] = (16, 8),  # resolutions with self-attention
                 label_balance: float = 0.5,         # t of mp_sum(noise embedding, class embedding)
                 concat_balance: float = 0.5,        # t of mp_cat(skip, main path)
                 **block_kwargs):                    # Block's keywords
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                      **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=res in attn_resolutions, **block_kwargs)

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            y = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(y), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, y) (Karras et al. 2022, eq. 7; Karras et al. 2024, sec. 2)
    with c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
    c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4, s_d = sigma_data = 0.5.
    No labels (None) on a conditional net: one all-zero label row. The U-Net runs in float16 only on CUDA with
    use_fp16; the rest is float32.
    """

    def __init__(self,
                 img_resolution: int,                # input resolution
                 img_channels: int,                  # input channels
                 label_dim: int,                     # classes; 0 = unconditional
                 use_fp16: bool = True,              # float16 U-Net on CUDA
                 sigma_data: float = 0.5,            # data standard deviation
                 logvar_channels: int = 128,         # width of the (unused) uncertainty head
                 **unet_kwargs):                     # UNet's keywords
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if self.use_fp16 and x.device.type == "cuda" else torch.float32
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)


def _source(path: Path) -> str:
    return f"{RELEASE_URL}{path.name} (NVlabs/edm2 generate_images.py presets)"


def load_network(checkpoint: str | Path, key: str = "ema", *, config_key: str | None = None,
                 sha256: str | None = None) -> Precond:
    """EDM2's Precond from a released network pickle, in eval mode without gradients.

    The pickle (an EasyDict {'ema': Precond, 'encoder', 'loss_fn', 'dataset_kwargs'}) is decoded by
    `edm_pickle.build_snapshot_network` (no pickled code is imported or run); the network is built from its stored
    constructor arguments and loaded strictly. It keeps the dtype its weights are stored in (the releases:
    float16, as generate_images.py runs them), so the learned gains are float16 scalars as in EDM2.
    """
    path = Path(checkpoint).expanduser()
    source = _source(path)
    require_file(path, source=source, sha256=sha256, config_key=config_key)
    net, state_dict = build_snapshot_network(path, key, source, {"Precond": Precond}, "EDM2")
    dtypes = {t.dtype for t in state_dict.values()}
    if len(dtypes) == 1:
        net.to(dtypes.pop())
    load_state_dict_checked(net, state_dict, path=path, source=source)
    return net.eval().requires_grad_(False)


def load_denoiser(checkpoint: str | Path, key: str = "ema", use_fp16: bool | None = None,
                  sha256: str | None = None) -> EDMDenoiser:
    """A released EDM2 network pickle as D(x; sigma, y), on EDM2's sampling range sigma in [0.002, 80].

    For ImageNet-512 x and D are EDM2's whitened VAE latents [B, 4, 64, 64] (decoded by `load_decoder`).
    use_fp16: float16 U-Net on CUDA (None: as stored; the releases say True).
    """
    net = load_network(checkpoint, key, config_key="backbone.denoiser.checkpoint", sha256=sha256)
    if use_fp16 is not None:
        net.use_fp16 = use_fp16
    return EDMDenoiser(net, img_channels=net.img_channels, img_resolution=net.img_resolution,
                       num_classes=net.label_dim, sigma_min=SIGMA_RANGE[0], sigma_max=SIGMA_RANGE[1])


def load_decoder(path: str | Path, raw_mean: Sequence[float] = VAE_RAW_MEAN, raw_std: Sequence[float] = VAE_RAW_STD,
                 final_mean: float = 0.0, final_std: float = 0.5,
                 config_key: str = "backbone.decoder.path") -> vae.VAEDecoder:
    """EDM2's latent -> pixel decoding (training/encoders.py StabilityVAEEncoder.decode) on the AutoencoderKL
    folder `path` (stabilityai/sd-vae-ft-mse).

    Final latents z = raw * scale + bias per channel, with scale = final_std / raw_std and
    bias = final_mean - raw_mean * scale in float32 as EDM2 computes them; decoding inverts that,
    (z - bias) / scale, and EDM2's VAE speaks [0, 1] pixels (it encoded x / 255).
    """
    scale = np.float32(final_std) / np.float32(raw_std)
    bias = np.float32(final_mean) - np.float32(raw_mean) * scale
    return vae.load_decoder(path, scale=scale.tolist(), bias=bias.tolist(), pixel_range=(0, 1),
                            config_key=config_key)
