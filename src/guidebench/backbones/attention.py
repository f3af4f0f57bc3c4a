"""Self-attention that a guidance method can perturb in named blocks: PAG's identity map (Ahn et al. 2024) and
SEG's query blur (Hong 2024).

A backbone's attention modules subclass `PerturbableAttention` and compute softmax(q k^T / sqrt(d)) v through
`attend`, which reads the module's `perturbation` (None: untouched, the same call as before). A block is named
by its path in the backbone network (the innermost `.net` of the denoiser): `middle_block.1` and
`input_blocks.14.1` on ADM, `blocks.13.attn` on DiT, `mid_attn` on the digits UNet. `perturb_attention`
switches the named blocks for the duration of a `with` block and restores them after it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("identity", "blur")
INF_BLUR_SIGMA = 9999.0  # SEG-SDXL (pipeline_seg.py): a blur sigma above this is the infinite blur (mean query)


class AttentionPerturbation(NamedTuple):
    """identity: the attention map is the identity, so each position's output is its own value (PAG);
    blur: the queries are Gaussian-blurred over the token grid with `blur_sigma` (SEG, sec. 3.3), the mean
    query for blur_sigma > INF_BLUR_SIGMA (inf)."""

    mode: str
    blur_sigma: float = math.inf


class PerturbableAttention(nn.Module):
    """Marks a self-attention module that `perturb_attention` may switch; `perturbation` None = unperturbed."""

    perturbation: AttentionPerturbation | None = None


def blur_queries(q: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """SEG's query blur (Hong 2024), per head and channel over the h x w token grid of q [B, H, T, C].

    Kernel: the normalised Gaussian exp(-u^2 / 2 sigma^2) on u = -(k-1)/2 .. (k-1)/2, k the odd number
    ceil(6 sigma) + 1 (or + 0) capped at the grid's odd size (h + 1 for even h), applied as the separable 2-D
    product after reflect padding by k // 2 (SEG-SDXL's gaussian_blur_2d). sigma > INF_BLUR_SIGMA: every
    query is the mean query, the limit sigma -> inf of blurring the attention logits, whose rows then agree.
    """
    b, heads, tokens, ch = q.shape
    h, w = grid
    if h * w != tokens:
        raise ValueError(f"query blur needs a {h}x{w} token grid, got {tokens} tokens")
    if sigma > INF_BLUR_SIGMA:
        return q.mean(dim=2, keepdim=True).expand_as(q)
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, h - (h % 2 - 1))
    u = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=torch.float64)
    kernel1d = torch.exp(-0.5 * (u / sigma) ** 2)
    kernel1d = (kernel1d / kernel1d.sum()).to(q)
    kernel = (kernel1d[:, None] * kernel1d[None, :]).expand(heads * ch, 1, size, size)
    img = q.permute(0, 1, 3, 2).reshape(b, heads * ch, h, w)
    img = F.conv2d(F.pad(img, [size // 2] * 4, mode="reflect"), kernel, groups=heads * ch)
    return img.reshape(b, heads, ch, tokens).permute(0, 1, 3, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perturbation: AttentionPerturbation | None,
           grid: tuple[int, int]) -> torch.Tensor:
    """softmax(q k^T / sqrt(C)) v for q, k, v [B, H, T, C] -> [B, H, T, C], perturbed as `perturbation` says."""
    if perturbation is None:
        return F.scaled_dot_product_attention(q, k, v)
    if perturbation.mode == "identity":
        return v
    return F.scaled_dot_product_attention(blur_queries(q, grid, perturbation.blur_sigma), k, v)


def backbone_network(denoiser) -> nn.Module:
    """The network inside a denoiser adapter (the innermost `.net`), whose module paths name the blocks."""
    net = denoiser
    while isinstance(getattr(net, "net", None), nn.Module):
        net = net.net
    return net


def attention_blocks(denoiser) -> dict[str, PerturbableAttention]:
    """The perturbable self-attention modules of a denoiser's network, by module path."""
    network = backbone_network(denoiser)
    if not isinstance(network, nn.Module):
        return {}
    return {name: m for name, m in network.named_modules() if isinstance(m, PerturbableAttention)}


def check_blocks(denoiser, blocks: Sequence[str], what: str = "guidance.blocks") -> dict[str, PerturbableAttention]:
    """The named attention modules; a clear error if the backbone has none or a name does not exist."""
    found = attention_blocks(denoiser)
    network = type(backbone_network(denoiser)).__name__
    if not found:
        raise ValueError(f"{network} has no self-attention blocks to perturb (PAG/SEG need one; the digits UNet "
                         "has one only when trained with model.attention_heads > 0, as the shipped digits diffusion.pt)")
    if not blocks:
        raise ValueError(f"{what} is empty; name one or more of {network}'s attention blocks: {', '.join(found)}")
    missing = [name for name in blocks if name not in found]
    if missing:
        raise ValueError(f"{what}: {network} has no attention block {', '.join(missing)}; "
                         f"its attention blocks are: {', '.join(found)}")
    return {name: found[name] for name in blocks}


@contextmanager
def perturb_attention(denoiser, blocks: Sequence[str], mode: str = "identity",
                      blur_sigma: float = math.inf) -> Iterator[None]:
    """Inside the `with` block the attention modules `blocks` of `denoiser` run perturbed (`AttentionPerturbation`);
    on exit (also on an error) they are unperturbed again."""
    if mode not in MODES:
        raise ValueError(f"attention perturbation mode={mode!r}; expected one of {', '.join(MODES)}")
    if mode == "blur" and not blur_sigma > 0:
        raise ValueError(f"the query blur needs blur_sigma > 0 (inf: the mean query), got {blur_sigma}")
    modules = check_blocks(denoiser, blocks)
    perturbation = AttentionPerturbation(mode, float(blur_sigma))
    try:
        for module in modules.values():
            module.perturbation = perturbation
        yield
    finally:
        for module in modules.values():
            module.perturbation = None
