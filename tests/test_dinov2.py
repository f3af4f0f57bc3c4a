"""DINOv2 features (FD-DINOv2) against an independent re-statement of DINOv2's forward, on a tiny random net.

The released ViT-L/14 file is 1.2 GB and not available offline; the same code path is exercised with a
small state dict in the released layout (37x37 position grid, mask_token, blocks.N.*, ls1/ls2.gamma).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from guidebench.checkpoints import CheckpointError, load_state_dict_checked
from guidebench.evaluation import dinov2


def released_layout(dim=32, depth=2, heads=4, grid=37, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 14, 14, s=0.05), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                   b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim), b + "ls1.gamma": 1 + r(dim),
                   b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim), b + "ls2.gamma": 1 + r(dim)})
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """DINOv2's DinoVisionTransformer.forward (eval, 518-px position grid interpolated per call), restated."""
    dim = sd["cls_token"].shape[-1]
    ln = lambda t, p: F.layer_norm(t, (dim,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    w0 = tokens.shape[-1]
    tokens = torch.cat([sd["cls_token"].expand(len(x), -1, -1), tokens.flatten(2).transpose(1, 2)], 1)
    m = math.isqrt(sd["pos_embed"].shape[1] - 1)
    grid = sd["pos_embed"][:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((w0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False)
    tokens = tokens + torch.cat([sd["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        h = ln(tokens, b + "norm1")
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(
            len(x), -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), -1) @ v
        att = att.transpose(1, 2).reshape(len(x), -1, dim)
        att = F.linear(att, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        tokens = tokens + sd[b + "ls1.gamma"] * att
        h = F.gelu(F.linear(ln(tokens, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        tokens = tokens + sd[b + "ls2.gamma"] * F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(tokens, "norm")[:, 0]


@pytest.fixture(scope="module")
def tiny():
    sd = released_layout()
    vit = dinov2.build_vit(embed_dim=32, depth=2, num_heads=4)
    load_state_dict_checked(vit, dinov2.convert_state_dict(sd), path="tiny", source="test")
    return sd, dinov2.DINOv2Features(vit.eval(), "dinov2-tiny")


@torch.no_grad()
def test_network_matches_dinov2_forward(tiny):
    sd, features = tiny
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(features.vit(x), reference_forward(sd, x, heads=4), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_preprocessing_is_edm2s(tiny):
    """EDM2 (resize_mode='torch'): bicubic antialiased resize of the uint8 image to 224, /255, ImageNet mean/std."""
    sd, features = tiny
    images = torch.randint(0, 256, (2, 3, 64, 48), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    x = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    out = features(images)
    assert set(out) == {"pool"} and out["pool"].shape == (2, 32)
    torch.testing.assert_close(out["pool"], reference_forward(sd, x, heads=4), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        features(images.float())


def test_pos_embed_interpolation_keeps_cls_and_checks_grid():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = dinov2.interpolate_pos_embed(pos, 16)
    assert out.shape == (1, 257, 8) and torch.equal(out[:, 0], pos[:, 0])
    with pytest.raises(ValueError, match="not a square grid"):
        dinov2.interpolate_pos_embed(torch.randn(1, 1 + 37 * 36, 8), 16)


def test_missing_weights_name_file_url_and_key(tmp_path):
    with pytest.raises(CheckpointError) as e:
        dinov2.load_dinov2(tmp_path / "dinov2_vitl14_pretrain.pth")
    for part in ("dinov2_vitl14_pretrain.pth", dinov2.URL, dinov2.CONFIG_KEY):
        assert part in str(e.value)

