"""DiT: latent diffusion with a transformer backbone (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers"; facebookresearch/DiT).

`DiT` is the adaLN-Zero variant of their sec. 3.2 (Fig. 3): the 4-channel VAE latent is cut into
p x p patches, embedded and summed with a fixed 2-D sin-cos position embedding; every block is
self-attention + MLP whose LayerNorms are modulated (shift, scale) and whose residual branches are
gated by an MLP of t-embedding + y-embedding; the last layer predicts eps and the learned-variance
value v per patch pixel. Parameter names equal those of the released DiT-XL-2-256x256.pt /
DiT-XL-2-512x512.pt state dicts. Attention, MLP and patch embedding are timm's (as DiT uses them).

`load_denoiser` wraps a checkpoint (released plain state dict, train.py checkpoint with 'ema', or a
diffusers `DiTTransformer2DModel` folder) as a sigma-space `DiscreteVPDenoiser` on the scaled latents
(linear betas, 1000 steps, learned variance; the null class num_classes drives classifier-free
guidance). DiT's own CFG rule guides only the first 3 latent channels:
`ClassifierFreeGuidance(scale, channels=3)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn

from guidebench.backbones.attention import PerturbableAttention, attend
from guidebench.checkpoints import CheckpointError, load_state_dict_checked, load_torch_file
from guidebench.denoisers.discrete_vp import DiscreteVPDenoiser, betas_for_schedule

RELEASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
RELEASED_FILES = frozenset({"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"})
LATENT_DOWNSAMPLE = 8  # the sd-vae-ft-* autoencoders map H x W x 3 images to H/8 x W/8 x 4 latents

# DiT's model table (Peebles & Xie 2023, Table 1; name = size / patch).
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_MODELS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for size, (d, h, n) in _SIZES.items() for p in (2, 4, 8)
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (1 + scale) + shift, per sample, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / (dim/2)), k < dim/2, float32 (GLIDE/ADM's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D position embedding [grid^2, dim] (MAE's, He et al. 2022), tokens in row-major order.

    The first dim/2 channels encode the column, the last dim/2 the row, each as
    [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim/4)); computed in float64.
    """
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(col), embed(row)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """t -> MLP(sinusoidal(t)): Linear(256, D), SiLU, Linear(D, D)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_size))


class LabelEmbedder(nn.Module):
    """Class embedding table; with dropout_prob > 0 it has one extra row, the null class `num_classes`.

    In training mode labels are replaced by the null class with probability dropout_prob
    (classifier-free guidance training, Ho & Salimans 2022).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class SelfAttention(PerturbableAttention, Attention):
    """timm's Attention (DiT's), unchanged while unperturbed; PAG/SEG perturb its map over the token grid."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.perturbation is None:
            return super().forward(x, attn_mask)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        g = math.isqrt(n)
        x = attend(self.q_norm(q), self.k_norm(k), v, self.perturbation, (g, g))  # [B, H, T, C]
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(b, n, -1))))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 Attn(mod(LN(x))), x += g2 MLP(mod(LN(x))), (shift, scale, gate) x 2 from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """mod(LN(x)) -> Linear to p * p * out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT eps/variance network net(x_t, t, y) -> [B, 2C (or C), H, W] (Peebles & Xie 2023, sec. 3).

    Arguments are those of DiT's models.DiT. y = num_classes (the null class) or y = None gives the
    unconditional prediction; it needs class_dropout_prob > 0 (the released models have 0.1).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid).unsqueeze(0))
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    @property
    def null_label(self) -> int | None:
        """The label of the unconditional (CFG) branch, or None without a null row."""
        return self.num_classes if self.y_embedder.embedding_table.num_embeddings > self.num_classes else None

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p * p * C] tokens (row-major grid) -> [B, C, H, W]."""
        p, c = self.patch_size, self.out_channels
        g = math.isqrt(x.shape[1])
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            if self.null_label is None:
                raise ValueError("this DiT has no null class (class_dropout_prob = 0); pass class labels")
            y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def architecture(model: str | Mapping[str, Any], image_size: int, **kwargs: Any) -> dict[str, Any]:
    """DiT keyword arguments for a DIT_MODELS name (or a mapping of depth / hidden_size / num_heads /
    patch_size [/ mlp_ratio]) at pixel resolution image_size (latent size image_size / 8)."""
    if isinstance(model, str):
        if model not in DIT_MODELS:
            raise ValueError(f"unknown DiT model {model!r}; expected one of {sorted(DIT_MODELS)} or a mapping "
                             "with depth, hidden_size, num_heads, patch_size")
        model = DIT_MODELS[model]
    missing = {"depth", "hidden_size", "num_heads", "patch_size"} - set(model)
    if missing:
        raise ValueError(f"DiT architecture {dict(model)} lacks {sorted(missing)}")
    if image_size % LATENT_DOWNSAMPLE:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE downsampling {LATENT_DOWNSAMPLE}")
    return {**dict(model), "input_size": image_size // LATENT_DOWNSAMPLE, **kwargs}


def describe_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """What architecture a DiT state dict holds, read off its shapes (for error messages)."""
    try:
        hidden, in_ch, p, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out_ch = state["final_layer.linear.weight"].shape[0] // (p * p)
        rows = state["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError, IndexError):
        return "not a DiT state dict"
    latent = math.isqrt(tokens) * p
    return (f"depth={depth}, hidden_size={hidden}, patch_size={p}, in_channels={in_ch}, out_channels={out_ch}, "
            f"latent {latent}x{latent} (image_size={latent * LATENT_DOWNSAMPLE}), {rows} label rows")


def _diffusers_dir(path: Path) -> Path:
    """The folder holding the transformer's config.json (a pipeline folder has it under transformer/)."""
    return path / "transformer" if (path / "transformer" / "config.json").is_file() else path


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """diffusion_pytorch_model[.safetensors|.bin], possibly sharded with an index.json."""
    from safetensors.torch import load_file

    def read(file: Path) -> Mapping[str, torch.Tensor]:
        if file.suffix == ".safetensors":
            return load_file(file)
        return load_torch_file(file, source=f"the diffusers folder {folder}")

    for ext in ("safetensors", "bin"):
        single = folder / f"diffusion_pytorch_model.{ext}"
        index = folder / f"diffusion_pytorch_model.{ext}.index.json"
        if single.is_file():
            return dict(read(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read(folder / shard).items()}
    raise CheckpointError(f"{folder} has a config.json but no diffusion_pytorch_model.safetensors/.bin weights")


_EMB_COPIES = {
    f"{src}.{part}": f"{dst}.{part}"
    for src, dst in (("timestep_embedder.linear_1", "t_embedder.mlp.0"),
                     ("timestep_embedder.linear_2", "t_embedder.mlp.2"),
                     ("class_embedder.embedding_table", "y_embedder.embedding_table"))
    for part in ("weight", "bias")
}


def diffusers_to_dit(config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                     path: str | Path = "<diffusers>") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """DiT kwargs and a DiT state dict from a diffusers DiTTransformer2DModel (or DiT-style
    Transformer2DModel) config + state dict.

    diffusers stores the t/y embedders once per block (norm1.emb); all copies must be equal (they
    are in converted DiT checkpoints). The fixed position embedding is not stored; DiT computes it.
    Note: diffusers' own forward differs from DiT's in the timestep frequencies (divides by half - 1)
    and the blocks' LayerNorm eps (1e-5); guidebench runs DiT's computation, the one the released
    weights were trained with.
    """
    name = config.get("_class_name", "DiTTransformer2DModel")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not config.get("patch_size"):
        raise CheckpointError(f"{path}: {name} with norm_type={config.get('norm_type')!r}, "
                              f"patch_size={config.get('patch_size')!r} is not a DiT (needs ada_norm_zero + patch_size)")
    if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise CheckpointError(f"{path}: activation_fn={config['activation_fn']!r}; DiT uses 'gelu-approximate'")
    heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
    in_ch = int(config.get("in_channels", 4))
    out_ch = int(config.get("out_channels") or in_ch)
    hidden = heads * head_dim
    fc1 = state.get("transformer_blocks.0.ff.net.0.proj.weight")
    kwargs = dict(
        input_size=int(config.get("sample_size", 32)), patch_size=int(config["patch_size"]), in_channels=in_ch,
        hidden_size=hidden, depth=int(config.get("num_layers", 28)), num_heads=heads,
        mlp_ratio=(fc1.shape[0] / hidden) if fc1 is not None else 4.0,
        class_dropout_prob=0.1, num_classes=int(config.get("num_embeds_ada_norm", 1000)), learn_sigma=out_ch == 2 * in_ch,
    )
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{path}: out_channels={out_ch} is neither in_channels nor 2 * in_channels")

    state = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for suffix in (".weight", ".bias"):
            if src + suffix in state:
                out[dst + suffix] = state.pop(src + suffix)

    emb = "transformer_blocks.{}.norm1.emb."
    take("pos_embed.proj", "x_embedder.proj")
    take(emb.format(0) + "timestep_embedder.linear_1", "t_embedder.mlp.0")
    take(emb.format(0) + "timestep_embedder.linear_2", "t_embedder.mlp.2")
    take(emb.format(0) + "class_embedder.embedding_table", "y_embedder.embedding_table")
    for i in range(kwargs["depth"]):
        blk, src = f"blocks.{i}.", f"transformer_blocks.{i}."
        for key in [k for k in state if k.startswith(emb.format(i))]:
            ref = out.get(_EMB_COPIES.get(key[len(emb.format(i)):], ""))
            if ref is None or not torch.equal(state.pop(key), ref):
                raise CheckpointError(f"{path}: {key} differs from block 0's embedder; DiT shares one t/y embedder")
        for part in ("weight", "bias"):
            qkv = [state.pop(f"{src}attn1.to_{n}.{part}", None) for n in "qkv"]
            if all(w is not None for w in qkv):
                out[f"{blk}attn.qkv.{part}"] = torch.cat(qkv)
        take(src + "attn1.to_out.0", blk + "attn.proj")
        take(src + "ff.net.0.proj", blk + "mlp.fc1")
        take(src + "ff.net.2", blk + "mlp.fc2")
        take(src + "norm1.linear", blk + "adaLN_modulation.1")
    take("proj_out_1", "final_layer.adaLN_modulation.1")
    take("proj_out_2", "final_layer.linear")
    state.pop("pos_embed.pos_embed", None)
    out.update(state)  # anything not converted shows up as an unexpected key when loading
    return kwargs, out


def load_dit(checkpoint: str | Path, model: str | Mapping[str, Any] = "DiT-XL/2", image_size: int = 256,
             num_classes: int = 1000, learn_sigma: bool = True, in_channels: int = 4,
             class_dropout_prob: float = 0.1, config_key: str = "backbone.denoiser.checkpoint") -> DiT:
    """A DiT with weights from `checkpoint`, in eval mode without gradients.

    checkpoint: a released plain state dict (DiT-XL-2-256x256.pt), a train.py checkpoint (its 'ema'
    weights are used, as DiT's download.find_model does), or a diffusers folder (model or pipeline).
    The architecture is `model` at `image_size`; a file that holds another one is refused with both listed.
    """
    kwargs = architecture(model, image_size, num_classes=num_classes, learn_sigma=learn_sigma,
                          in_channels=in_channels, class_dropout_prob=class_dropout_prob)
    path = Path(checkpoint).expanduser()
    name = path.name
    source = (f"{RELEASE_URL}{name} (facebookresearch/DiT download.py)" if name in RELEASED_FILES
              else f"a DiT state dict or diffusers DiT folder; released weights: {RELEASE_URL}DiT-XL-2-256x256.pt "
                   f"and {RELEASE_URL}DiT-XL-2-512x512.pt")
    if path.is_dir():
        folder = _diffusers_dir(path)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path} is a folder without a diffusers config.json (set {config_key}=PATH). "
                                  f"Expected: {source}")
        file_kwargs, state = diffusers_to_dit(json.loads((folder / "config.json").read_text()),
                                              _read_diffusers_weights(folder), folder)
        diff = {k: (file_kwargs[k], v) for k, v in kwargs.items() if k != "class_dropout_prob" and file_kwargs[k] != v}
        if diff:
            raise CheckpointError(f"{folder} holds another DiT than configured: "
                                  + ", ".join(f"{k}: file {a} vs config {b}" for k, (a, b) in diff.items()))
        state["pos_embed"] = sincos_pos_embed_2d(kwargs["hidden_size"], kwargs["input_size"] // kwargs["patch_size"])[None]
    else:
        state = load_torch_file(path, source=source, config_key=config_key)
        if isinstance(state, Mapping) and "ema" in state:
            state = state["ema"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict. Expected: {source}")
    net = DiT(**kwargs)
    try:
        load_state_dict_checked(net, state, path=path, source=source)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. The file holds: {describe_state_dict(state)}; the config asks for "
                              f"{model if isinstance(model, str) else dict(model)} at image_size={image_size}") from None
    return net.eval().requires_grad_(False)


def load_denoiser(checkpoint: str | Path, model: str | Mapping[str, Any] = "DiT-XL/2", image_size: int = 256,
                  num_classes: int = 1000, learn_sigma: bool = True, in_channels: int = 4,
                  class_dropout_prob: float = 0.1) -> DiscreteVPDenoiser:
    """A DiT checkpoint as D(x; sigma, y) on the VAE latents (already multiplied by 0.18215).

    DiT is trained with ADM's diffusion: linear betas over 1000 steps, eps prediction, learned
    variance (Peebles & Xie 2023, sec. 3.1); its samplers do not clip x0 (sample.py clip_denoised=False).
    The null label num_classes is the unconditional branch of classifier-free guidance.
    """
    net = load_dit(checkpoint, model, image_size, num_classes, learn_sigma, in_channels, class_dropout_prob)
    return DiscreteVPDenoiser(
        net,
        betas_for_schedule("linear", 1000),
        img_channels=in_channels,
        img_resolution=image_size // LATENT_DOWNSAMPLE,
        num_classes=num_classes,
        null_label=net.null_label,
        parameterisation="eps",
        learned_variance=learn_sigma,
        clip_x0=False,
    )
