"""EDM (NVlabs/edm) networks read from EDM pickles vs. the reference code's outputs (golden edm*.pt)."""

from __future__ import annotations


import pytest
import torch

from guidebench.backbones.edm import EDMPrecond, iDDPMPrecond, load_denoiser, load_network
from guidebench.backbones.edm_pickle import ModuleRecord, read_network_pickle, record_state_dict
from guidebench.checkpoints import CheckpointError
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_heun
from guidebench.schedules import sigmas_karras
from tests.golden import golden_path, load_golden

CASES = {"edm": ("edm_snapshot.pkl", "edm.pt"), "iddpm": ("edm_iddpm_snapshot.pkl", "edm_iddpm.pt")}
# README tolerance table: single forwards atol 1e-5 / rtol 1e-4; Heun samples atol 1e-4; the iDDPM fixture
# (large magnitudes) rtol 1e-4 with atol 1e-3.
FORWARD_TOL = {"edm": dict(atol=1e-5, rtol=1e-4), "iddpm": dict(atol=1e-3, rtol=1e-4)}
SAMPLE_TOL = {"edm": dict(atol=1e-4, rtol=0.0), "iddpm": dict(atol=1e-3, rtol=1e-4)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    pkl, pt = CASES[request.param]
    path = golden_path(pkl)
    return request.param, path, load_golden(pt), load_denoiser(path)


def _kwargs(golden: dict) -> dict:
    return {k: v for k, v in golden["network_kwargs"].items() if k != "class_name"}


@pytest.mark.golden
def test_pickle_decodes_to_records(case):
    name, path, g, _ = case
    data = read_network_pickle(path)
    ema = data["ema"]
    assert isinstance(ema, ModuleRecord)
    assert ema.class_name == g["network_kwargs"]["class_name"].rsplit(".", 1)[1]
    assert ema.state["_init_kwargs"] == _kwargs(g)
    assert ema.state["_modules"]["model"].class_name == g["network_kwargs"]["model_type"]
    sd = record_state_dict(ema)
    # the format guarantees the network's own parameters and buffers (a one-level net has no resample_filter)
    expected = {"EDMPrecond": EDMPrecond, "iDDPMPrecond": iDDPMPrecond}[ema.class_name](**_kwargs(g)).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert all(torch.equal(v, torch.full([1, 1, 2, 2], 0.25)) for k, v in sd.items() if k.endswith("resample_filter"))
    if name == "edm":  # a training snapshot: the loss and dataset kwargs come along, as data
        assert data["loss_fn"].class_name == "EDMLoss" and data["augment_pipe"] is None
        assert isinstance(data["dataset_kwargs"], dict)


@pytest.mark.golden
def test_forward_matches_reference(case):
    name, _, g, den = case
    net = den.net
    labels = g.get("class_labels")
    with torch.no_grad():
        torch.testing.assert_close(net(g["x"], g["sigma"], labels), g["out"], **FORWARD_TOL[name])
        if name == "edm":
            torch.testing.assert_close(net(g["x"], g["sigma"], None), g["out_no_labels"], **FORWARD_TOL[name])
            # The same forward through the Denoiser adapter with int64 labels.
            torch.testing.assert_close(den(g["x"], g["sigma"], g["class_idx"]).x0, g["out"], **FORWARD_TOL[name])
            # Karras et al. 2022, Table 1: c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4.
            s = g["sigma"].reshape(-1, 1, 1, 1)
            c_in, c_noise = 1 / (s**2 + 0.25).sqrt(), s.log().flatten() / 4
        else:
            # iDDPM: c_in = 1 / sqrt(sigma^2 + 1), c_noise = M - 1 - argmin_j |u_j - sigma|.
            s = g["sigma"].reshape(-1, 1, 1, 1)
            c_in, c_noise = 1 / (s**2 + 1).sqrt(), g["M"] - 1 - g["round_sigma_index"].to(torch.float32)
        backbone = net.model(c_in * g["x"], c_noise, labels)
    torch.testing.assert_close(backbone, g["backbone_out"], atol=1e-5, rtol=1e-4)


@pytest.mark.golden
def test_iddpm_grid_and_rounding():
    g = load_golden("edm_iddpm.pt")
    net = load_network(golden_path("edm_iddpm_snapshot.pkl"))
    fresh = iDDPMPrecond(**_kwargs(g))  # the grid u computed from C_1, C_2, M, not loaded
    assert (fresh.C_1, fresh.C_2, fresh.M) == (g["C_1"], g["C_2"], g["M"])
    # The float32 recursion over M levels: one-ulp differences of sin/pow between torch builds add up to ~10 ulp.
    torch.testing.assert_close(fresh.u, g["u"], rtol=1e-5, atol=0)
    torch.testing.assert_close(net.u, g["u"], rtol=0, atol=0)
    assert (net.sigma_min, net.sigma_max) == (g["sigma_min"], g["sigma_max"])
    torch.testing.assert_close(net.round_sigma(g["sigma"]), g["round_sigma_out"], rtol=0, atol=0)
    torch.testing.assert_close(net.round_sigma(g["sigma"], return_index=True), g["round_sigma_index"], rtol=0, atol=0)
    # Every level rounds to itself; a level between two grid points rounds to the nearer one.
    torch.testing.assert_close(net.round_sigma(g["u"][:-1]), g["u"][:-1], rtol=0, atol=0)
    mid = g["u"][10] * 0.3 + g["u"][11] * 0.7
    assert net.round_sigma(mid.reshape(1), return_index=True).item() == 11


def _edm_uint8(images: torch.Tensor) -> torch.Tensor:
    """EDM generate.py's PNG conversion: clip(x * 127.5 + 128, 0, 255) -> uint8, NHWC."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@pytest.mark.golden
def test_heun_trajectory_matches_edm_sampler(case):
    name, _, g, den = case
    s, kw = g["sampler"], g["sampler"]["kwargs"]
    n = len(s["seeds"])
    rnd = StackedRandomGenerator("cpu", s["seeds"])
    latents = rnd.randn([n, den.img_channels, den.img_resolution, den.img_resolution])
    torch.testing.assert_close(latents, s["latents"], rtol=0, atol=0)
    labels = None
    if den.num_classes:  # EDM draws the labels after the latents, from the same per-seed generators
        labels = rnd.randint(den.num_classes, size=[n])
        torch.testing.assert_close(labels, s["class_idx"], rtol=0, atol=0)
        torch.testing.assert_close(torch.eye(den.num_classes)[labels], s["class_labels"], rtol=0, atol=0)

    assert max(kw["sigma_min"], den.sigma_min) == s["sigma_min_used"]
    assert min(kw["sigma_max"], den.sigma_max) == s["sigma_max_used"]
    sigmas = sigmas_karras(den, kw["num_steps"], kw["sigma_min"], kw["sigma_max"], kw["rho"])
    torch.testing.assert_close(sigmas, s["t_steps"], rtol=0, atol=0)

    with torch.no_grad():
        images = sample_heun(den, latents.to(torch.float64) * sigmas[0], sigmas, labels, rng=rnd,
                             S_churn=kw["S_churn"], S_min=kw["S_min"], S_max=kw["S_max"], S_noise=kw["S_noise"])
    assert images.dtype == torch.float64
    torch.testing.assert_close(images, s["images"], **SAMPLE_TOL[name])

    assert torch.equal(_edm_uint8(s["images"]), s["images_uint8"])
    ours, ref = _edm_uint8(images).int(), s["images_uint8"].int()
    # Truncation to uint8 may flip by one only where the reference sits within the tolerance of an integer.
    level = (s["images"] * 127.5 + 128).clip(0, 255).permute(0, 2, 3, 1)
    slack = 127.5 * (SAMPLE_TOL[name]["atol"] + SAMPLE_TOL[name]["rtol"] * s["images"].abs().max())
    near = (level - level.round()).abs() <= slack
    assert torch.all((ours == ref) | (near & ((ours - ref).abs() <= 1)))


@pytest.mark.golden
def test_heun_draws_edm_noise_stream(case):
    """With S_churn > 0, EDM draws one randn_like per step, also outside [S_min, S_max]."""
    _, _, g, den = case
    s = g["sampler"]
    sigmas = sigmas_karras(den, 4, 0.002, 80.0, 7.0)

    class Counting(StackedRandomGenerator):
        draws = 0

        def randn_like(self, x):
            Counting.draws += 1
            return super().randn_like(x)

    rnd = Counting("cpu", s["seeds"])
    labels = rnd.randint(den.num_classes, size=[len(s["seeds"])]) if den.num_classes else None
    x = s["latents"].to(torch.float64) * sigmas[0]
    with torch.no_grad():
        sample_heun(den, x, sigmas, labels, rng=rnd, S_churn=10.0, S_min=1.0, S_max=10.0)
    assert Counting.draws == len(sigmas) - 1


def test_missing_checkpoint_names_the_release_url(tmp_path):
    url = r"nvlabs-fi-cdn\.nvidia\.com/edm/pretrained/edm-imagenet-64x64-cond-adm\.pkl"
    with pytest.raises(CheckpointError, match=url):
        load_denoiser(tmp_path / "edm-imagenet-64x64-cond-adm.pkl")


@pytest.mark.golden
def test_wrong_key_and_weights_are_named(tmp_path):
    path = golden_path("edm_snapshot.pkl")
    with pytest.raises(CheckpointError, match="no network under key 'model'"):
        load_network(path, key="model")
    with pytest.raises(CheckpointError, match="holds EDMLoss"):
        load_network(path, key="loss_fn")


# EDM's ImageNet-64 'adm' network (train.py --arch=adm --cond=1, Karras et al. 2022 Table 7).
IMAGENET64 = dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=192,
                  channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.1)


@pytest.fixture(scope="module")
def imagenet64():
    torch.manual_seed(0)
    return EDMPrecond(**IMAGENET64).eval()


def test_full_size_parameter_count(imagenet64, capsys):
    """295,899,267 parameters = EDM's 295.90 M "model capacity" for ImageNet-64 (Karras et al. 2022, Table 7)."""
    count = sum(p.numel() for p in imagenet64.parameters())
    with capsys.disabled():
        print(f"\nEDM ImageNet-64 (DhariwalUNet): {count:,} parameters", end="")
    assert count == 295_899_267
    sd = imagenet64.state_dict()
    assert sd["model.map_label.weight"].shape == (768, 1000)
    assert sd["model.enc.64x64_conv.weight"].shape == (192, 3, 3, 3)
    assert sd["model.enc.32x32_down.skip.resample_filter"].shape == (1, 1, 2, 2)
    assert sd["model.enc.32x32_block0.qkv.weight"].shape == (3 * 384, 384, 1, 1)
    assert "model.enc.64x64_block0.qkv.weight" not in sd  # 64x64 is not an attention resolution
    assert sd["model.dec.8x8_in0.proj.weight"].shape == (768, 768, 1, 1)
    assert sd["model.out_conv.weight"].shape == (3, 192, 3, 3)


def test_full_size_forward_shape(imagenet64):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = imagenet64(x, torch.tensor([1.0]), torch.eye(1000)[[7]])
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    # Fresh nets have zero-initialised output convs (EDM's init_zero), so D(x; sigma) = c_skip x exactly.
    torch.testing.assert_close(out, x * 0.25 / (1 + 0.25))
