"""DiT (Peebles & Xie 2023) against facebookresearch/DiT outputs stored in dit.pt (golden README sec. 4)."""

from contextlib import contextmanager

import pytest
import torch

from guidebench.backbones.dit import DiT, load_denoiser, load_dit
from guidebench.checkpoints import CheckpointError
from guidebench.guidance import ClassifierFreeGuidance
from guidebench.samplers import ddpm_step_moments, sample_ddim
from guidebench.schedules import sigmas_respaced, space_timesteps
from tests.golden import load_golden

pytestmark = pytest.mark.golden
FORWARD = dict(atol=1e-5, rtol=1e-4)
ARCH_KEYS = ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio")


@pytest.fixture(scope="module")
def golden():
    return load_golden("dit.pt")


def loader_kwargs(kw):
    """load_denoiser / load_dit arguments that rebuild the stored DiT kwargs."""
    return dict(model={k: kw[k] for k in ARCH_KEYS}, image_size=kw["input_size"] * 8, num_classes=kw["num_classes"],
                learn_sigma=kw["learn_sigma"], in_channels=kw["in_channels"],
                class_dropout_prob=kw["class_dropout_prob"])


@pytest.fixture(scope="module")
def released_file(golden, tmp_path_factory):
    """The stored state dict written as DiT's released files are: a plain state dict."""
    path = tmp_path_factory.mktemp("dit") / "dit-small.pt"
    torch.save(golden["state_dict"], path)
    return path


@pytest.fixture(scope="module")
def denoiser(golden, released_file):
    return load_denoiser(released_file, **loader_kwargs(golden["kwargs"]))


@contextmanager
def explicit_attention(net):
    """timm Attention with fused_attn=False: softmax(QK^T / sqrt(d)) V written out."""
    for block in net.blocks:
        block.attn.fused_attn = False
    try:
        yield
    finally:
        for block in net.blocks:
            block.attn.fused_attn = True


def vp_to_sigma(x_t, sigma):
    return x_t.to(torch.float64) * (1 + sigma.to(torch.float64) ** 2).sqrt().reshape(-1, 1, 1, 1)


def test_position_embedding_is_dits_fixed_sincos(golden):
    net = DiT(**golden["kwargs"])
    torch.testing.assert_close(net.pos_embed, golden["state_dict"]["pos_embed"], atol=1e-7, rtol=0)


def test_forward_matches_reference(golden, denoiser):
    net = denoiser.net
    assert net.null_label == golden["kwargs"]["num_classes"] == denoiser.null_label
    with torch.no_grad():
        torch.testing.assert_close(net(golden["x"], golden["t"], golden["y"]), golden["out"], **FORWARD)
        with explicit_attention(net):
            torch.testing.assert_close(net(golden["x"], golden["t"], golden["y"]), golden["out_manual_attn"], **FORWARD)


def test_null_label_is_the_unconditional_branch(golden, denoiser):
    net, n = denoiser.net, golden["kwargs"]["num_classes"]
    x, t = golden["x"], golden["t"]
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, None), net(x, t, torch.full_like(golden["y"], n)), rtol=0, atol=0)


def test_cfg_with_dit_channel_quirk_matches_forward_with_cfg(golden, denoiser):
    cfg = golden["cfg"]
    n, c = len(cfg["y"]) // 2, golden["kwargs"]["in_channels"]
    if c < 3:
        pytest.skip("with < 3 latent channels DiT's hard-coded 3 reaches the variance outputs")
    t, labels = cfg["t"][:n], cfg["y"][:n]
    sigma = denoiser.sigmas[t]
    x = vp_to_sigma(cfg["x"][:n], sigma)
    guidance = ClassifierFreeGuidance(scale=cfg["cfg_scale"], channels=3)
    guidance.check(denoiser)
    with torch.no_grad():
        den = guidance(denoiser, x.float(), sigma, labels)
        eps = (x - den.x0.double()) / sigma.reshape(-1, 1, 1, 1)
        torch.testing.assert_close(eps.float(), cfg["out"][:n, :c], **FORWARD)
        torch.testing.assert_close(2 * den.var_frac - 1, cfg["out"][:n, c:], **FORWARD)
        # the null half of forward_with_cfg passes the unconditional channels 3.. through
        null = torch.full_like(labels, denoiser.null_label)
        torch.testing.assert_close(denoiser.net(cfg["x"][n:], t, null)[:, 3:], cfg["out"][n:, 3:], **FORWARD)
        # without the quirk channel 3 is guided too, and differs from the reference
        plain = ClassifierFreeGuidance(scale=cfg["cfg_scale"])(denoiser, x.float(), sigma, labels)
        eps_plain = (x - plain.x0.double()) / sigma.reshape(-1, 1, 1, 1)
        torch.testing.assert_close(eps_plain[:, :3].float(), cfg["out"][:n, :3], **FORWARD)
        if c > 3:
            assert not torch.allclose(eps_plain[:, 3:c].float(), cfg["out"][:n, 3:c], atol=1e-3)


def sample_atol(ref: torch.Tensor) -> float:
    """README's 1e-4 for samples, normwise beyond O(10): unclipped, a random DiT's trajectory grows to O(100), and
    float32 (theirs) vs float64 (our solver) arithmetic differs by ~2e-6 of the step's largest value."""
    return max(1e-4, 1e-5 * ref.abs().max().item())


def test_ddim_cfg_loop_matches_reference(golden, denoiser):
    """GaussianDiffusion.ddim_sample_loop(forward_with_cfg): guidebench runs the conditional half only;
    the reference's first half depends only on itself (forward_with_cfg duplicates x[:n])."""
    dd = golden["ddim"]
    if dd["eta"] != 0:
        pytest.skip("eta > 0 draws reference noise from torch's global RNG; only eta = 0 is comparable")
    assert space_timesteps(1000, dd["respacing"]) == list(dd["use_timesteps"])
    n = len(dd["y"]) // 2
    sigmas = sigmas_respaced(denoiser, dd["respacing"])
    abar = denoiser.alphas_cumprod[dd["use_timesteps"]]
    torch.testing.assert_close(1 - abar / torch.cat([abar.new_ones(1), abar[:-1]]), dd["betas"], rtol=1e-10, atol=0)
    x = dd["z_T"][:n].to(torch.float64) * (1 + sigmas[0] ** 2).sqrt()
    steps = []

    def record(info):
        sigma_next = sigmas[info["i"] + 1]
        steps.append(info["x"] / (1 + sigma_next**2).sqrt())

    denoiser.clip_x0 = bool(dd["clip_denoised"])
    try:
        with torch.no_grad():
            out = sample_ddim(denoiser, x, sigmas, dd["y"][:n], eta=0.0, callback=record,
                              guidance=ClassifierFreeGuidance(scale=dd["cfg_scale"], channels=3))
    finally:
        denoiser.clip_x0 = False
    assert len(steps) == len(dd["trajectory"])
    for k, x_k in enumerate(steps):
        ref = dd["trajectory"][k][:n]
        torch.testing.assert_close(x_k.float(), ref, atol=sample_atol(ref), rtol=1e-4,
                                   msg=lambda m: f"step {k}: {m}")
    ref = dd["sample"][:n]
    torch.testing.assert_close(out.float(), ref, atol=sample_atol(ref), rtol=1e-4)


def test_p_mean_variance_with_learned_variance_matches_reference(golden, denoiser):
    """SpacedDiffusion.p_mean_variance(forward_with_cfg) = guidebench CFG + ddpm_step_moments('learned')."""
    p = golden["pmv"]
    kept = space_timesteps(1000, p["respacing"])
    assert kept == list(p["timestep_map"])
    n = len(p["y"]) // 2
    sigmas = sigmas_respaced(denoiser, p["respacing"])
    guidance = ClassifierFreeGuidance(scale=p["cfg_scale"], channels=3)
    for step in p["steps"]:
        i = len(kept) - 1 - step["index"]  # sigmas are descending
        assert kept[step["index"]] == step["t_mapped"]
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = vp_to_sigma(step["x_t"][:n], sigma.expand(n))
        with torch.no_grad():
            den = guidance(denoiser, x.float(), sigma.expand(n), p["y"][:n])
        mean, var = ddpm_step_moments(x, den, sigmas, i, "learned")
        scale = 1 + sigma_next**2  # sigma space -> VP: x_vp = x / sqrt(1 + sigma'^2)
        where = f"index {step['index']}"
        torch.testing.assert_close(den.x0, step["pred_xstart"][:n], atol=5e-4, rtol=1e-4, msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close((mean / scale.sqrt()).float(), step["mean"][:n], **FORWARD,
                                   msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close((var / scale).log().float(), step["log_variance"][:n], **FORWARD,
                                   msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close((var / scale).float(), step["variance"][:n], atol=1e-9, rtol=1e-4,
                                   msg=lambda m: f"{where}: {m}")


def to_diffusers_layout(state, depth):
    """DiT's state dict in diffusers' DiTTransformer2DModel layout (t/y embedders copied into every block)."""
    out = {}
    for part in ("weight", "bias"):
        out[f"pos_embed.proj.{part}"] = state[f"x_embedder.proj.{part}"]
        out[f"proj_out_1.{part}"] = state[f"final_layer.adaLN_modulation.1.{part}"]
        out[f"proj_out_2.{part}"] = state[f"final_layer.linear.{part}"]
        for i in range(depth):
            src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
            for name, w in zip("qkv", state[f"{src}attn.qkv.{part}"].chunk(3)):
                out[f"{dst}attn1.to_{name}.{part}"] = w
            out[f"{dst}attn1.to_out.0.{part}"] = state[f"{src}attn.proj.{part}"]
            out[f"{dst}ff.net.0.proj.{part}"] = state[f"{src}mlp.fc1.{part}"]
            out[f"{dst}ff.net.2.{part}"] = state[f"{src}mlp.fc2.{part}"]
            out[f"{dst}norm1.linear.{part}"] = state[f"{src}adaLN_modulation.1.{part}"]
            out[f"{dst}norm1.emb.timestep_embedder.linear_1.{part}"] = state[f"t_embedder.mlp.0.{part}"]
            out[f"{dst}norm1.emb.timestep_embedder.linear_2.{part}"] = state[f"t_embedder.mlp.2.{part}"]
    for i in range(depth):
        out[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = \
            state["y_embedder.embedding_table.weight"]
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def diffusers_model(golden):
    diffusers = pytest.importorskip("diffusers")
    kw = golden["kwargs"]
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=kw["num_heads"], attention_head_dim=kw["hidden_size"] // kw["num_heads"],
        in_channels=kw["in_channels"], out_channels=2 * kw["in_channels"] if kw["learn_sigma"] else kw["in_channels"],
        num_layers=kw["depth"], sample_size=kw["input_size"], patch_size=kw["patch_size"],
        num_embeds_ada_norm=kw["num_classes"], norm_eps=1e-6,
    ).eval()
    model.load_state_dict(to_diffusers_layout(golden["state_dict"], kw["depth"]), strict=True)
    return model


def test_diffusers_layout_is_the_same_function(golden, diffusers_model):
    """With DiT's timestep frequencies (diffusers divides by half - 1) diffusers' own forward gives `out`:
    the layout conversion in this test is right, independently of guidebench's converter."""
    for block in diffusers_model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    try:
        with torch.no_grad():
            out = diffusers_model(golden["x"], golden["t"], golden["y"]).sample
    finally:
        for block in diffusers_model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 1
    torch.testing.assert_close(out, golden["out"], **FORWARD)


def test_loads_diffusers_pipeline_folder(golden, diffusers_model, tmp_path):
    diffusers_model.save_pretrained(tmp_path / "transformer")
    net = load_dit(tmp_path, **loader_kwargs(golden["kwargs"]))
    with torch.no_grad():
        torch.testing.assert_close(net(golden["x"], golden["t"], golden["y"]), golden["out"], **FORWARD)
    with pytest.raises(CheckpointError, match=r"depth: file \d+ vs config \d+"):
        kw = loader_kwargs(golden["kwargs"])
        load_dit(tmp_path / "transformer", **{**kw, "model": {**kw["model"], "depth": kw["model"]["depth"] + 1}})


def test_train_checkpoint_uses_ema(golden, tmp_path):
    path = tmp_path / "0400000.pt"
    bad = {k: torch.zeros_like(v) for k, v in golden["state_dict"].items()}
    torch.save({"model": bad, "ema": golden["state_dict"], "opt": {}, "args": None}, path)
    net = load_dit(path, **loader_kwargs(golden["kwargs"]))
    with torch.no_grad():
        torch.testing.assert_close(net(golden["x"], golden["t"], golden["y"]), golden["out"], **FORWARD)


def test_wrong_architecture_names_the_difference(golden, released_file):
    kw = loader_kwargs(golden["kwargs"])
    size = kw["image_size"]
    with pytest.raises(CheckpointError) as err:
        load_dit(released_file, **{**kw, "image_size": 2 * size})
    msg = str(err.value)
    assert str(released_file) in msg and "pos_embed" in msg and f"image_size={size}" in msg


def test_diffusers_embedder_copies_must_agree(golden):
    from guidebench.backbones.dit import diffusers_to_dit

    kw = golden["kwargs"]
    state = to_diffusers_layout(golden["state_dict"], kw["depth"])
    config = dict(_class_name="DiTTransformer2DModel", num_attention_heads=kw["num_heads"],
                  attention_head_dim=kw["hidden_size"] // kw["num_heads"], in_channels=kw["in_channels"],
                  num_layers=kw["depth"], sample_size=kw["input_size"], patch_size=kw["patch_size"],
                  num_embeds_ada_norm=kw["num_classes"])
    converted_kwargs, converted = diffusers_to_dit(config, state)
    assert converted_kwargs["depth"] == kw["depth"] and not converted_kwargs["learn_sigma"]  # out_channels unset
    assert set(converted) == set(golden["state_dict"]) - {"pos_embed"}
    key = f"transformer_blocks.{kw['depth'] - 1}.norm1.emb.timestep_embedder.linear_1.bias"
    state[key] = state[key] + 1
    with pytest.raises(CheckpointError, match="differs from block 0"):
        diffusers_to_dit(config, state)
