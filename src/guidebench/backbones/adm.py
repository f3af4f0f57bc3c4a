"""ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"; openai/guided-diffusion).

`UNetModel` is the ablated U-Net of their sec. 3 (BigGAN up/down-sampling residual blocks,
adaptive group normalisation = "scale-shift norm", multi-head attention at 32/16/8 px) and
`EncoderUNetModel` the noise-aware classifier of sec. 4.1 (the U-Net's down half with an
attention-pool head). Parameter names equal those of the released `.pt` state dicts, so the
files load with a strict `load_state_dict`. Both are built from ADM's command-line flags exactly
as guided-diffusion's `script_util.create_model` / `create_classifier` derive them.

`load_denoiser` wraps a released diffusion checkpoint as a sigma-space `DiscreteVPDenoiser`
(eps prediction, learned variance of Nichol & Dhariwal 2021 eq. 15, betas of their eq. 17 or Ho
et al.'s linear schedule). The respacing is a sampler choice (`guidebench.schedules.sigmas_respaced`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from guidebench.backbones.attention import AttentionPerturbation, PerturbableAttention, attend
from guidebench.checkpoints import CheckpointError, load_state_dict_checked, load_torch_file, require_file
from guidebench.denoisers.discrete_vp import DiscreteVPDenoiser, betas_for_schedule

NUM_CLASSES = 1000
RELEASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
RELEASED_FILES = frozenset(
    f"{name}.pt" for name in ("64x64_diffusion", "128x128_diffusion", "256x256_diffusion", "256x256_diffusion_uncond",
                              "512x512_diffusion", "64x64_classifier", "128x128_classifier", "256x256_classifier",
                              "512x512_classifier")
)

# Defaults of guided-diffusion's command-line flags (script_util.*_defaults): a flag left out of a
# README command line has this value. use_kl, rescale_learned_sigmas and use_checkpoint only change
# training; they are accepted so that a full ADM flag set loads as is.
DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
    predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
)
MODEL_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
    use_scale_shift_norm=True, resblock_updown=False, use_fp16=False, use_new_attention_order=False,
)
CLASSIFIER_DEFAULTS: dict[str, Any] = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention",
)


# ----------------------------------------------------------------------------------------------
# Layers


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, always computed in float32 (ADM's `normalization`)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: ADM starts every residual branch and the output at zero (its `zero_module`)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / (dim/2)) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def qkv_attention(qkv: torch.Tensor, num_heads: int, legacy: bool, queries: int | None = None,
                  perturbation: AttentionPerturbation | None = None, grid: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Multi-head softmax attention on a fused [B, 3 H C, T] projection -> [B, H C, T].

    legacy: channels ordered (head, q/k/v, C) (ADM's QKVAttentionLegacy); else (q/k/v, head, C)
    (QKVAttention, `use_new_attention_order`). `queries`: attend only for the first n positions.
    perturbation, grid: PAG/SEG's perturbation of the map over the h x w positions (`attention.attend`).
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    shape = (b, num_heads, 3, ch, length) if legacy else (b, 3, num_heads, ch, length)
    q, k, v = qkv.reshape(shape).unbind(2 if legacy else 1)  # each [B, H, C, T]
    if queries is not None:
        q = q[..., :queries]
    out = attend(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), perturbation, grid)
    return out.transpose(-1, -2).reshape(b, num_heads * ch, -1)


class AttentionBlock(PerturbableAttention):
    """Self-attention over all positions with a residual connection (ADM sec. 3, "attention heads");
    PAG/SEG perturb it by its module path (`backbones.attention`)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, legacy: bool = True):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} attention channels are not divisible by "
                                 f"num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.legacy = legacy
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy,
                                        perturbation=self.perturbation, grid=tuple(spatial)))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (Radford et al. 2021): the mean token attends to all positions."""

    def __init__(self, spatial: int, channels: int, num_head_channels: int, out_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.num_heads = channels // num_head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        return self.c_proj(qkv_attention(self.qkv_proj(x), self.num_heads, legacy=False, queries=1))[:, :, 0]


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3x3 conv (`op`), or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest), then an optional 3x3 conv (`conv`)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding (ADM sec. 3).

    scale_shift: AdaGN, GroupNorm(h) (1 + s) + b with (s, b) from the embedding; else h + e.
    up / down: BigGAN-style resampling inside the block (`resblock_updown`).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 scale_shift: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample = Upsample(channels, False) if up else Downsample(channels, False) if down else None
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None:
            h = self.resample(self.in_layers[:-1](x))
            x = self.resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class EmbedSequential(nn.Sequential):
    """Sequential that also hands the embedding to its ResBlocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# Networks


class _DownPath(nn.Module):
    """time_embed, [label_emb,] input_blocks and middle_block: the part shared by the U-Net and the classifier."""

    def __init__(self, *, in_channels: int, model_channels: int, num_res_blocks: int, attention_ds: Sequence[int],
                 dropout: float, channel_mult: Sequence[float], num_heads: int, num_head_channels: int,
                 scale_shift: bool, resblock_updown: bool, legacy_attention: bool, num_classes: int | None = None):
        super().__init__()
        self.model_channels = model_channels
        self.dtype = torch.float32
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = nn.Embedding(num_classes, emb_ch) if num_classes is not None else None

        def attention(c: int, heads: int) -> AttentionBlock:
            return AttentionBlock(c, heads, num_head_channels, legacy_attention)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self.skip_channels, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, dropout, int(mult * model_channels), scale_shift)]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = (ResBlock(ch, emb_ch, dropout, ch, scale_shift, down=True) if resblock_updown
                        else Downsample(ch, True))
                self.input_blocks.append(EmbedSequential(down))
                self.skip_channels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(ResBlock(ch, emb_ch, dropout, scale_shift=scale_shift),
                                            attention(ch, num_heads),
                                            ResBlock(ch, emb_ch, dropout, scale_shift=scale_shift))
        self.channels, self.ds = ch, ds

    def torso(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block]

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Run the torso's convolutions in `dtype` (ADM's convert_to_fp16); norms, embeddings and head stay float32."""
        self.dtype = dtype
        for part in self.torso():
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)


class UNetModel(_DownPath):
    """ADM's U-Net eps(x_t, t, y) (Dhariwal & Nichol 2021, sec. 3; table 1 ablations).

    attention_ds: downsampling rates (image_size // resolution) with self-attention;
    num_classes: None for an unconditional model (which then ignores y, as classifier_sample.py does).
    """

    def __init__(self, *, in_channels: int = 3, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_ds: Sequence[int], dropout: float = 0.0, channel_mult: Sequence[float] = (1, 2, 4, 8),
                 num_classes: int | None = None, num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, scale_shift: bool = False, resblock_updown: bool = False,
                 legacy_attention: bool = True):
        super().__init__(in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
                         attention_ds=attention_ds, dropout=dropout, channel_mult=channel_mult, num_heads=num_heads,
                         num_head_channels=num_head_channels, scale_shift=scale_shift,
                         resblock_updown=resblock_updown, legacy_attention=legacy_attention, num_classes=num_classes)
        emb_ch = 4 * model_channels
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        skips, ch, ds = list(self.skip_channels), self.channels, self.ds
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), emb_ch, dropout, int(mult * model_channels),
                                                    scale_shift)]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads_up, num_head_channels, legacy_attention))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, dropout, ch, scale_shift, up=True) if resblock_updown
                                  else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def torso(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, 3, R, R] VP sample x_t; t: [B] training step index; y: [B] labels -> [B, out_channels, R, R]."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_emb is not None:
            if y is None or y.shape != (x.shape[0],):
                raise ValueError(f"class-conditional ADM needs labels y of shape [{x.shape[0]}], got "
                                 f"{None if y is None else tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        skips, h = [], x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


class EncoderUNetModel(_DownPath):
    """ADM's noisy classifier p(y | x_t, t) (Dhariwal & Nichol 2021, sec. 4.1): the U-Net's down
    half and middle block, then GroupNorm, SiLU and an attention pool to `out_channels` logits."""

    def __init__(self, *, image_size: int, in_channels: int = 3, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_ds: Sequence[int], channel_mult: Sequence[float],
                 num_head_channels: int = 64, scale_shift: bool = False, resblock_updown: bool = False):
        super().__init__(in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
                         attention_ds=attention_ds, dropout=0.0, channel_mult=channel_mult, num_heads=1,
                         num_head_channels=num_head_channels, scale_shift=scale_shift,
                         resblock_updown=resblock_updown, legacy_attention=True)
        self.out = nn.Sequential(GroupNorm32(self.channels), nn.SiLU(),
                                 AttentionPool2d(image_size // self.ds, self.channels, num_head_channels, out_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, R, R] VP sample x_t; t: [B] training step index -> [B, out_channels] logits."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb).to(x.dtype))


# ----------------------------------------------------------------------------------------------
# Flags -> modules (script_util.create_model / create_classifier)


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """Channel multipliers per resolution level that ADM uses for each ImageNet size."""
    mults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if image_size not in mults:
        raise ValueError(f"ADM has no default channel_mult for image_size={image_size}; "
                         f"expected one of {sorted(mults)}")
    return mults[image_size]


def _int_list(value: str | int | Sequence[int]) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def attention_ds(attention_resolutions: str | int | Sequence[int], image_size: int) -> tuple[int, ...]:
    """ADM's attention_resolutions ("32,16,8": feature-map sizes) as downsampling rates image_size // res."""
    return tuple(image_size // r for r in _int_list(attention_resolutions))


def complete_flags(flags: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    """ADM flags with defaults filled in; unknown names and a set timestep_respacing are errors."""
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(f"unknown ADM {what} flag(s) {unknown}; expected a subset of {sorted(defaults)}")
    if flags.get("timestep_respacing"):
        raise ValueError(f"timestep_respacing={flags['timestep_respacing']!r} is a sampler setting here: set "
                         "sampler.schedule.respacing instead (guidebench.schedules.sigmas_respaced)")
    return {**defaults, **flags}


def create_unet(flags: Mapping[str, Any]) -> UNetModel:
    """The UNetModel that guided-diffusion's create_model_and_diffusion(**flags) builds (float32, eval mode)."""
    f = complete_flags(flags, {**MODEL_DEFAULTS, **DIFFUSION_DEFAULTS}, "model")
    size = int(f["image_size"])
    mult = tuple(_int_list(f["channel_mult"])) if f["channel_mult"] not in ("", None) else default_channel_mult(size)
    return UNetModel(
        model_channels=int(f["num_channels"]),
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=int(f["num_res_blocks"]),
        attention_ds=attention_ds(f["attention_resolutions"], size),
        dropout=float(f["dropout"]),
        channel_mult=mult,
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        num_heads=int(f["num_heads"]),
        num_head_channels=int(f["num_head_channels"]),
        num_heads_upsample=int(f["num_heads_upsample"]),
        scale_shift=bool(f["use_scale_shift_norm"]),
        resblock_updown=bool(f["resblock_updown"]),
        legacy_attention=not f["use_new_attention_order"],
    ).eval()


def create_classifier(flags: Mapping[str, Any]) -> EncoderUNetModel:
    """The EncoderUNetModel of guided-diffusion's create_classifier(**flags) (float32, eval mode).

    ADM fixes channel_mult by image_size, 64 channels per attention head and 1000 outputs.
    """
    f = complete_flags(flags, {**CLASSIFIER_DEFAULTS, **DIFFUSION_DEFAULTS}, "classifier")
    if f["classifier_pool"] != "attention":
        raise ValueError(f"classifier_pool={f['classifier_pool']!r} is not supported: the released ADM "
                         "classifiers all use 'attention'")
    size = int(f["image_size"])
    return EncoderUNetModel(
        image_size=size,
        model_channels=int(f["classifier_width"]),
        out_channels=NUM_CLASSES,
        num_res_blocks=int(f["classifier_depth"]),
        attention_ds=attention_ds(f["classifier_attention_resolutions"], size),
        channel_mult=default_channel_mult(size),
        num_head_channels=64,
        scale_shift=bool(f["classifier_use_scale_shift_norm"]),
        resblock_updown=bool(f["classifier_resblock_updown"]),
    ).eval()


def resolve_dtype(dtype: str | torch.dtype | None, use_fp16: bool) -> torch.dtype:
    """The compute dtype: `dtype` if given, else float16 when the released flags say use_fp16."""
    if dtype is None:
        return torch.float16 if use_fp16 else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def checkpoint_source(checkpoint: str | Path) -> str:
    """Where a guided-diffusion checkpoint comes from (shown in every error about it)."""
    name = Path(checkpoint).name
    if name in RELEASED_FILES:
        return f"{RELEASE_URL}{name} (openai/guided-diffusion README)"
    return f"an openai/guided-diffusion state dict; released files are listed at {RELEASE_URL}<name>.pt"


def load_weights(net: nn.Module, checkpoint: str | Path, config_key: str) -> None:
    """Strictly load a guided-diffusion state dict into `net`; errors name the file, what differs and the source."""
    source = checkpoint_source(checkpoint)
    state = load_torch_file(checkpoint, source=source, config_key=config_key)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{checkpoint} holds a {type(state).__name__}, not a state dict. Expected: {source}")
    load_state_dict_checked(net, state, path=checkpoint, source=source)


def load_denoiser(checkpoint: str | Path, *, dtype: str | None = None, clip_x0: bool = True,
                  sha256: str | None = None, **flags: Any) -> DiscreteVPDenoiser:
    """A released ADM diffusion model as D(x; sigma, y).

    checkpoint: a guided-diffusion state dict (e.g. 256x256_diffusion.pt);
    flags: its MODEL_FLAGS (guided-diffusion README), diffusion flags included; respacing is not one
           of them (the sampler's schedule);
    dtype: compute dtype of the U-Net torso (float32 / float16 / bfloat16); default float16 if
           use_fp16 else float32; outputs are float32;
    clip_x0: clamp x0 to [-1, 1] (ADM's clip_denoised, on in all its sampling scripts);
    sha256: if given, the file must have this hash.
    Labels index the 1000 ImageNet classes; there is no null label (ADM is not trained for CFG).
    """
    f = complete_flags(flags, {**MODEL_DEFAULTS, **DIFFUSION_DEFAULTS}, "model")
    compute_dtype = resolve_dtype(dtype, f["use_fp16"])
    require_file(checkpoint, source=checkpoint_source(checkpoint), sha256=sha256,
                 config_key="backbone.denoiser.checkpoint")
    net = create_unet(f)
    load_weights(net, checkpoint, "backbone.denoiser.checkpoint")
    net.set_dtype(compute_dtype)
    net.requires_grad_(False)
    steps = int(f["diffusion_steps"])
    return DiscreteVPDenoiser(
        net,
        betas_for_schedule(f["noise_schedule"], steps),
        img_channels=3,
        img_resolution=int(f["image_size"]),
        num_classes=NUM_CLASSES,
        null_label=None,
        parameterisation="x0" if f["predict_xstart"] else "eps",
        learned_variance=bool(f["learn_sigma"]),
        clip_x0=clip_x0,
        timestep_scale=1000 / steps if f["rescale_timesteps"] else 1.0,
    )
