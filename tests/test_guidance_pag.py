"""PAG and SEG: the attention perturbations written out on the blocks, the guided rule against the formula and
diffusers' guiders on the same tensors (without their defects), block names, NFE and a CLI run on digits."""

import csv
import json
import math
from unittest import mock

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from guidebench.backbones.adm import AttentionBlock, create_unet
from guidebench.backbones.attention import attention_blocks, blur_queries, perturb_attention
from guidebench.backbones.digits import load_denoiser
from guidebench.backbones.dit import DiT, SelfAttention
from guidebench.config import CONF_DIR, REPO_ROOT
from guidebench.denoisers.discrete_vp import DiscreteVPDenoiser, betas_for_schedule
from guidebench.generate import generate
from guidebench.guidance.pag import PAG_BLOCKS, PerturbedAttentionGuidance, SmoothedEnergyGuidance
from guidebench.samplers import sample_ddim
from guidebench.sampling import sample
from guidebench.schedules import sigmas_respaced
from tests.test_cli import cli

DIGITS = REPO_ROOT / "checkpoints" / "digits"
TINY_ADM = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16,8", channel_mult="1,2,2",
                num_head_channels=16, class_cond=True, learn_sigma=True, resblock_updown=True)


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.3^2) (ADM zero-initialises proj_out, which would hide the attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_adm() -> DiscreteVPDenoiser:
    return DiscreteVPDenoiser(randomised(create_unet(TINY_ADM)), betas_for_schedule("linear", 1000), img_channels=3,
                              img_resolution=32, num_classes=1000, learned_variance=True)


def tiny_dit() -> DiT:
    return randomised(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4))


@pytest.fixture(scope="module")
def digits_attn():
    return load_denoiser(DIGITS / "diffusion.pt")


def attention_free_checkpoint(folder):
    """A digits diffusion checkpoint without the self-attention block (model.attention_heads=0), random weights."""
    from guidebench.backbones.digits import DigitsUNet
    from guidebench.training.checkpoint import save_checkpoint

    model = {"channels": 8, "channel_mult": 2, "num_res_blocks": 1, "emb_dim": 16, "num_classes": 10,
             "attention_heads": 0}
    return save_checkpoint(folder / "no_attention.pt", DigitsUNet(**model), {"task": "diffusion", "model": model,
                                                                          "train": {}}, {})


def digits_batch(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(n, 1, 8, 8, generator=g), torch.full((n,), 1.2, dtype=torch.float64), torch.arange(n) % 10


def adm_qkv(block: AttentionBlock, x: torch.Tensor):
    """q, k, v [B, H, T, C] of an ADM block, read off its fused projection by channel order."""
    b, c, *_ = x.shape
    qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
    h, t = block.num_heads, qkv.shape[-1]
    parts = qkv.reshape(b, h, 3, c // h, t).unbind(2) if block.legacy else qkv.reshape(b, 3, h, c // h, t).unbind(1)
    return [p.transpose(-1, -2) for p in parts]


@pytest.mark.parametrize("legacy", [True, False])
def test_identity_attention_makes_the_adm_block_output_its_value_projection(legacy):
    """PAG's identity map: softmax(q k^T) -> I, so block(x) = x + proj_out(v)."""
    net = torch.nn.ModuleDict({"attn": randomised(AttentionBlock(32, num_heads=4, legacy=legacy))})
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    _, _, v = adm_qkv(net.attn, x)
    expected = x + net.attn.proj_out(v.transpose(-1, -2).reshape(2, 32, 16)).reshape(2, 32, 4, 4)
    with perturb_attention(net, ["attn"]):
        torch.testing.assert_close(net.attn(x), expected)


def test_identity_attention_makes_the_dit_attention_output_its_value_projection():
    net = torch.nn.ModuleDict({"attn": randomised(SelfAttention(32, num_heads=4, qkv_bias=True))})
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    v = net.attn.qkv(x).reshape(2, 16, 3, 4, 8)[:, :, 2]  # [B, T, H, C]: q/k/v, then heads, in timm's layout
    with perturb_attention(net, ["attn"]):
        torch.testing.assert_close(net.attn(x), net.attn.proj(v.reshape(2, 16, 32)))


@pytest.mark.parametrize("sigma", [math.inf, 1e5])
def test_infinite_query_blur_gives_every_position_the_mean_querys_attention(sigma):
    """SEG's sigma -> inf: each query is the mean query, so every position attends alike (uniform over queries):
    out_t = softmax(q_bar k^T / sqrt(C)) v for all t."""
    net = torch.nn.ModuleDict({"attn": randomised(AttentionBlock(32, num_heads=2), seed=4)})
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(5))
    q, k, v = adm_qkv(net.attn, x)
    q_bar = q.mean(dim=2, keepdim=True)
    weights = torch.softmax(q_bar @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, 1, T]
    attended = (weights @ v).expand_as(v)
    expected = x + net.attn.proj_out(attended.transpose(-1, -2).reshape(2, 32, 16)).reshape(x.shape)
    with perturb_attention(net, ["attn"], "blur", sigma):
        out = net.attn(x)
    torch.testing.assert_close(out, expected)
    assert torch.allclose((out - x).flatten(2), (out - x).flatten(2)[..., :1].expand(-1, -1, 16), atol=1e-6)


@pytest.mark.parametrize("grid", [2, 4, 5, 8])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0, math.inf])
def test_query_blur_matches_segs_gaussian_blur(grid, sigma):
    """diffusers' SEG blur (SEG-SDXL's kernel; its finite/infinite branches are swapped by `is_inf`, so each
    branch is selected here through the threshold) on the same queries, as [B, T, H C]."""
    blur_utils = pytest.importorskip("diffusers.hooks.smoothed_energy_guidance_utils")
    q = torch.randn(2, 3, grid * grid, 5, generator=torch.Generator().manual_seed(grid))
    flat = q.transpose(1, 2).reshape(2, grid * grid, 15).clone()
    size = math.ceil(6 * min(sigma, 1e3)) + 1 - math.ceil(6 * min(sigma, 1e3)) % 2
    theirs = blur_utils._gaussian_blur_2d(flat, size, sigma, math.inf if sigma == math.inf else -1.0)
    ours = blur_queries(q, (grid, grid), sigma)
    torch.testing.assert_close(ours.transpose(1, 2).reshape(2, grid * grid, 15), theirs)


def test_perturbation_off_restores_every_backbone_exactly(digits_attn):
    adm, dit = tiny_adm(), tiny_dit()
    x_adm = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    x_dit = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    t, y = torch.tensor([10, 700]), torch.tensor([3, 5])
    cases = [(adm.net, lambda: adm.net(x_adm, t, y), ["middle_block.1", "input_blocks.3.1"]),
             (dit, lambda: dit(x_dit, t, y), ["blocks.0.attn", "blocks.2.attn"]),
             (digits_attn, lambda: digits_attn(*digits_batch()).x0, ["mid_attn"])]
    for net, forward, blocks in cases:
        before = forward()
        for mode in ("identity", "blur"):
            with perturb_attention(net, blocks, mode, 1.0):
                assert not torch.allclose(forward(), before)
            assert torch.equal(forward(), before)
        with pytest.raises(RuntimeError), perturb_attention(net, blocks):
            raise RuntimeError
        assert torch.equal(forward(), before) and all(m.perturbation is None for m in attention_blocks(net).values())


def test_pag_and_seg_equal_the_written_out_rule(digits_attn):
    """D = D_c + s (D_c - D_p); with CFG D = D_u + w (D_c - D_u) + s (D_c - D_p)."""
    den = digits_attn
    x, sigma, y = digits_batch()
    cond, uncond = den(x, sigma, y).x0, den(x, sigma, torch.full_like(y, 10)).x0
    with perturb_attention(den, ["mid_attn"]):
        identity = den(x, sigma, y).x0
    with perturb_attention(den, ["mid_attn"], "blur", 0.5):
        blurred = den(x, sigma, y).x0
    assert (cond - identity).abs().max() > 1e-3 and (cond - blurred).abs().max() > 1e-3
    torch.testing.assert_close(PerturbedAttentionGuidance(3.0)(den, x, sigma, y).x0, cond + 3 * (cond - identity))
    torch.testing.assert_close(PerturbedAttentionGuidance(2.0, cfg_scale=1.5)(den, x, sigma, y).x0,
                               uncond + 1.5 * (cond - uncond) + 2 * (cond - identity))
    torch.testing.assert_close(SmoothedEnergyGuidance(3.0, blur_sigma=0.5)(den, x, sigma, y).x0,
                               cond + 3 * (cond - blurred))
    torch.testing.assert_close(PerturbedAttentionGuidance(0.0, cfg_scale=2.0)(den, x, sigma, y).x0,
                               uncond + 2 * (cond - uncond))
    assert torch.equal(PerturbedAttentionGuidance(0.0)(den, x, sigma, y).x0, cond)


@pytest.mark.parametrize("cfg_scale, rescale", [(1.0, 0.0), (1.5, 0.0), (3.0, 0.7)])
def test_pag_and_seg_match_diffusers_guiders_on_the_same_tensors(digits_attn, cfg_scale, rescale):
    """diffusers combines (pred_cond, pred_uncond, pred_cond_perturbed): its native form with guidance_scale = w and,
    with CFG off, its original formulation (the native one then starts from D_p: D_p + s (D_c - D_p))."""
    guiders = pytest.importorskip("diffusers.guiders")
    den, s = digits_attn, 2.0
    x, sigma, y = digits_batch()
    cond, uncond = den(x, sigma, y).x0, den(x, sigma, torch.full_like(y, 10)).x0
    for ours, mode, sigma_blur in [(PerturbedAttentionGuidance(s, cfg_scale, rescale=rescale), "identity", 1.0),
                                   (SmoothedEnergyGuidance(s, 0.7, cfg_scale, rescale=rescale), "blur", 0.7)]:
        with perturb_attention(den, ["mid_attn"], mode, sigma_blur):
            perturbed = den(x, sigma, y).x0
        common = dict(guidance_rescale=rescale, use_original_formulation=cfg_scale == 1,
                      guidance_scale=0.0 if cfg_scale == 1 else cfg_scale)
        if mode == "identity":
            theirs = guiders.PerturbedAttentionGuidance(perturbed_guidance_scale=s, perturbed_guidance_layers=[0],
                                                        perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                                        **common)
        else:
            theirs = guiders.SmoothedEnergyGuidance(seg_guidance_scale=s, seg_guidance_layers=[0], seg_blur_sigma=0.7,
                                                    **common)
        expected = theirs.forward(cond, uncond if cfg_scale != 1 else None, perturbed).pred
        torch.testing.assert_close(ours(den, x, sigma, y).x0, expected)


def test_ours_perturb_without_cfg_where_diffusers_guiders_never_do(digits_attn):
    """diffusers' PAG hooks its perturbation only on the third prepared batch, so not without CFG; its SEG never
    counts its batches, so it never hooks. Ours run D_p with or without CFG (and it differs from D_c)."""
    pag_mod = pytest.importorskip("diffusers.guiders.perturbed_attention_guidance")
    seg_mod = pytest.importorskip("diffusers.guiders.smoothed_energy_guidance")
    hooked = {}
    for name, mod, hook, guider in [
        ("pag", pag_mod, "_apply_layer_skip_hook", lambda w: pag_mod.PerturbedAttentionGuidance(
            guidance_scale=w, perturbed_guidance_scale=3.0, perturbed_guidance_layers=[0],
            perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)),
        ("seg", seg_mod, "_apply_smoothed_energy_guidance_hook", lambda w: seg_mod.SmoothedEnergyGuidance(
            guidance_scale=w, seg_guidance_scale=3.0, seg_guidance_layers=[0]))]:
        for w in (1.0, 3.0):
            g = guider(w)
            with mock.patch.object(mod, hook) as applied, mock.patch.object(mod.HookRegistry,
                                                                            "check_if_exists_or_initialize"):
                g.set_state(step=5, num_inference_steps=10, timestep=torch.tensor(500))
                for _ in range(g.num_conditions):
                    g.prepare_models(torch.nn.Identity())
                    g.cleanup_models(torch.nn.Identity())
            hooked[name, w] = applied.call_count
    assert hooked == {("pag", 1.0): 0, ("pag", 3.0): 1, ("seg", 1.0): 0, ("seg", 3.0): 0}
    x, sigma, y = digits_batch()
    cond = digits_attn(x, sigma, y).x0
    for method in (PerturbedAttentionGuidance(3.0), SmoothedEnergyGuidance(3.0)):
        assert (method(digits_attn, x, sigma, y).x0 - cond).abs().max() > 1e-2


def test_block_names_are_listed_and_validated_before_sampling(tmp_path):
    adm = tiny_adm()
    # ADM at 32 px, channel_mult 1,2,2, one res block, attention at 16 and 8 px: input block 3 (16 px) and 5 (8 px),
    # the middle block, output blocks 0-1 (8 px) and 2-3 (16 px); the attention layer is each block's second
    assert list(attention_blocks(adm)) == ["input_blocks.3.1", "input_blocks.5.1", "middle_block.1",
                                           "output_blocks.0.1", "output_blocks.1.1", "output_blocks.2.1",
                                           "output_blocks.3.1"]
    assert list(attention_blocks(tiny_dit())) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    PerturbedAttentionGuidance(3.0, blocks=["middle_block.1", "input_blocks.5.1"]).check(adm)
    with pytest.raises(ValueError, match=r"no attention block middle_block\.9.*are: input_blocks\.3\.1, input"):
        PerturbedAttentionGuidance(3.0, blocks=["middle_block.9"]).check(adm)
    with pytest.raises(ValueError, match="no default blocks for UNetModel at resolution 32.*middle_block.1"):
        SmoothedEnergyGuidance(3.0).check(adm)
    with pytest.raises(ValueError, match="null label"):  # ADM has none: CFG on top of PAG cannot run
        PerturbedAttentionGuidance(3.0, cfg_scale=2.0, blocks=["middle_block.1"]).check(adm)
    with pytest.raises(ValueError, match="no self-attention blocks.*attention_heads"):
        PerturbedAttentionGuidance(3.0).check(load_denoiser(attention_free_checkpoint(tmp_path)))
    with pytest.raises(ValueError, match="blur_sigma must be > 0"):
        SmoothedEnergyGuidance(3.0, blur_sigma=0.0)
    with pytest.raises(ValueError, match="expected one of identity, blur"):
        with perturb_attention(adm, ["middle_block.1"], "drop"):
            pass


def test_default_blocks_are_the_official_adm_256_and_dit_xl_blocks():
    """PAG's ADM-256 set exists in the adm_256 flags' U-Net (and its unconditional twin); DiT-XL/2 has blocks.1.attn."""
    for name in ("adm_256", "adm_256_uncond"):
        flags = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml").denoiser)
        flags = {k: v for k, v in flags.items() if k not in ("_target_", "checkpoint", "sha256", "dtype", "clip_x0")}
        with torch.device("meta"):
            names = attention_blocks(create_unet(flags))
        assert set(PAG_BLOCKS["UNetModel", 256]) <= set(names) and len(names) == 16  # 6 encoder, middle, 9 decoder
    with torch.device("meta"):
        names = attention_blocks(DiT(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16))
    assert set(PAG_BLOCKS["DiT", 32]) <= set(names) and len(names) == 28


def test_nfe_two_per_step_alone_three_with_cfg_fewer_outside_the_interval(digits_attn):
    sigmas = sigmas_respaced(digits_attn, "ddim5")
    counts = {}
    for key, method in {"pag": PerturbedAttentionGuidance(3.0), "pag+cfg": PerturbedAttentionGuidance(3.0, 2.0),
                        "seg": SmoothedEnergyGuidance(3.0), "pag window": PerturbedAttentionGuidance(
                            3.0, interval_steps=[0.0, 0.6])}.items():
        counts[key] = generate(digits_attn, sample_ddim, sigmas, range(4), num_classes=10, guidance=method)["nfe"]
    assert counts == {"pag": 10, "pag+cfg": 15, "seg": 10, "pag window": 3 * 2 + 2 * 1}


def test_configs_carry_the_papers_defaults(compose_cfg):
    pag = hydra.utils.instantiate(compose_cfg("sample", ["guidance=pag"]).guidance)
    seg = hydra.utils.instantiate(compose_cfg("sample", ["guidance=seg"]).guidance)
    assert (type(pag), pag.scale - 1, pag.cfg_scale, pag.blocks, pag.mode) == (
        PerturbedAttentionGuidance, 3.0, 1.0, None, "identity")
    assert (type(seg), seg.scale - 1, seg.blur_sigma, seg.mode) == (SmoothedEnergyGuidance, 3.0, math.inf, "blur")


def test_sampling_stage_runs_pag_with_cfg_on_the_digits_attention_model_and_refuses_one_without(compose_cfg, tmp_path):
    """guidebench-sample's work function on the composed config (the console script is tested below, slow)."""
    out = tmp_path / "samples"
    cfg = compose_cfg("sample", ["backbone=digits", "guidance=pag", "guidance.cfg_scale=2", "sampling.num_samples=16",
                                 "sampler.schedule.respacing=ddim5", f"sampling.out_dir={out}"])
    sample(cfg)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["written"] == 16 and manifest["nfe"] == 15  # 3 per DDIM step: (y, null) batched, then D_p
    assert manifest["fingerprint"]["guidance"] == "pag" and manifest["fingerprint"]["scale"] == 3.0
    refused = tmp_path / "refused"
    cfg = compose_cfg("sample", ["backbone=digits_uncond", "guidance=seg", "sampling.num_samples=8",
                                 f"backbone.denoiser.checkpoint={attention_free_checkpoint(tmp_path)}",
                                 f"sampling.out_dir={refused}"])
    with pytest.raises(ValueError, match="no self-attention blocks"):
        sample(cfg)
    assert not list(refused.rglob("shard-*.npz"))  # refused before anything was sampled


@pytest.mark.slow
def test_cli_run_pag_on_the_unconditional_digits_model_and_refuse_seg_without_attention(tmp_path):
    """The console scripts end to end: unconditional guidance (no null label needed), evaluated; a refusal."""
    run = tmp_path / "run"
    cli("guidebench-run", "backbone=digits_uncond", "guidance=pag",
        "sampling.num_samples=64",
        "sampler.schedule.respacing=ddim10", f"hydra.run.dir={run}", f"evaluation.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    (row,) = csv.DictReader((run / "summary.csv").read_text().splitlines())
    assert metrics["num_samples"] == 64 and metrics["fid"] > 0 and float(row["nfe"]) == 20
    proc = cli("guidebench-sample", "backbone=digits_uncond", "guidance=seg", "sampling.num_samples=8",
               f"backbone.denoiser.checkpoint={attention_free_checkpoint(tmp_path)}",
               f"sampling.out_dir={tmp_path / 'refused'}", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "no self-attention blocks" in proc.stderr
