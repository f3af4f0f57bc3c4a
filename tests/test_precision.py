"""sampling.dtype / tf32 / compile: the denoiser network under autocast or torch.compile, the rest untouched."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from guidebench.backbones.attention import backbone_network
from guidebench.precision import AutocastNetwork, configure_networks
from guidebench.sampling import sample
from guidebench.shards import ShardError, read_shard, shard_name

FAST = ["sampling.num_samples=12", "sampling.batch_size=12", "sampling.shard_size=12", "sampling.device=cpu",
        "sampler.schedule.respacing=ddim5"]


def images(run_dir):
    return read_shard(run_dir / "shards" / shard_name(0))["arr_0"]


class Probe(nn.Module):
    """Records the dtype its linear layer computes in."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen = None

    def forward(self, x, t=None, y=None):
        out = self.lin(x)
        self.seen = out.dtype
        return out


def test_autocast_runs_the_network_in_the_dtype_and_keeps_its_attributes():
    net = Probe()
    wrapped = AutocastNetwork(net, torch.bfloat16)
    out = wrapped(torch.randn(2, 4))
    assert net.seen == torch.bfloat16 and out.dtype == torch.bfloat16
    assert wrapped.lin is net.lin and wrapped.get_submodule("net.lin") is net.lin
    net(torch.randn(2, 4))
    assert net.seen == torch.float32  # outside the wrapper, float32 again


def test_bf16_and_fp16_samples_are_close_to_fp32_but_recorded_apart(compose_cfg, tmp_path):
    runs = {}
    for dtype in ("fp32", "bf16", "fp16"):
        cfg = compose_cfg("sample", [*FAST, f"sampling.dtype={dtype}", "guidance=cfg", "guidance.scale=2"])
        cfg.sampling.out_dir = str(tmp_path / dtype)
        runs[dtype] = images(sample(cfg)).astype(int)
        manifest = json.loads((tmp_path / dtype / "run.json").read_text())
        assert manifest["fingerprint"]["precision"] == {"dtype": dtype, "tf32": False}
    for dtype in ("bf16", "fp16"):
        diff = np.abs(runs[dtype] - runs["fp32"])
        assert diff.max() > 0, f"{dtype} gave fp32's bytes: autocast did not act"
        assert diff.mean() < 8, f"{dtype} samples far from fp32's (mean |diff| {diff.mean():.1f} of 255)"
    cfg = compose_cfg("sample", [*FAST, "sampling.dtype=fp32", "guidance=cfg", "guidance.scale=2"])
    cfg.sampling.out_dir = str(tmp_path / "bf16")
    with pytest.raises(ShardError, match="precision"):
        sample(cfg)  # bf16 shards are not completed with fp32 samples
    assert (tmp_path / "bf16" / "shards" / shard_name(0)).is_file()


def test_perturbed_attention_still_reaches_the_network_under_autocast(compose_cfg, tmp_path):
    out = {}
    for name, overrides in {"pag": ["guidance=pag", "guidance.scale=3"], "none": ["guidance=none"]}.items():
        cfg = compose_cfg("sample", [*FAST, "sampling.dtype=bf16", "backbone=digits_uncond", *overrides])
        cfg.sampling.out_dir = str(tmp_path / name)
        out[name] = images(sample(cfg))
    assert not np.array_equal(out["pag"], out["none"])


def test_only_denoisers_are_configured(compose_cfg):
    from guidebench.sampling import build_backbone, build_guidance

    cfg = compose_cfg("sample", ["guidance=autoguidance"])
    backbone = build_backbone(cfg.backbone)
    guidance = build_guidance(cfg)
    inner = backbone_network(backbone.denoiser)
    configure_networks([backbone.denoiser, *vars(guidance).values(), torch.nn.Linear(2, 2)], "bf16")
    assert isinstance(backbone.denoiser.net, AutocastNetwork) and isinstance(guidance.guide.net, AutocastNetwork)
    assert backbone_network(backbone.denoiser) is inner  # PAG's block paths are unchanged
    with pytest.raises(ValueError, match="sampling.dtype=fp8 is not one of fp32, bf16, fp16"):
        configure_networks([backbone.denoiser], "fp8")


@pytest.mark.slow
def test_compiled_network_gives_the_same_samples_up_to_rounding(compose_cfg, tmp_path):
    runs = {}
    for flag in ("false", "true"):
        cfg = compose_cfg("sample", [*FAST, f"sampling.compile={flag}"])
        cfg.sampling.out_dir = str(tmp_path / flag)
        runs[flag] = images(sample(cfg)).astype(int)
    assert np.abs(runs["true"] - runs["false"]).max() <= 1
