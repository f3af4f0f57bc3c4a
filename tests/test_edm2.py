"""EDM2 (NVlabs/edm2) networks read from pickles that EDM2's own code wrote vs. EDM2's own outputs.

Fixtures (tests/fixtures/edm2/, 1.1 MB) were made outside this repository with NVlabs/edm2 at commit
4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc (the "Autoguidance release"), run unmodified on CPU with torch 2.13.0 and
numpy 2.4.6 (nothing stubbed). Four tiny `training.networks_edm2.Precond`s, each built after
`torch.manual_seed(seed)` (MPConv weights randn, MPFourier buffers randn / rand), then perturbed with
`torch.Generator().manual_seed(1000 + seed)`: every 0-dim gain (emb_gain, out_gain; zero at init, which makes F = 0)
set to 0.3 + U(0, 1), every other parameter's rows scaled by 1 + 0.5 U(0, 1) (the stored rows are not unit-norm, so
the forward's weight normalisation is needed to match):

    latent_cond    seed 1  img_resolution 8, img_channels 4, label_dim 10, model_channels 16, channel_mult [1, 2],
                           num_blocks 1, attn_resolutions [4], channels_per_head 16, logvar_channels 8
    latent_guide   seed 2  as latent_cond with model_channels 8, channels_per_head 8
    latent_uncond  seed 3  as latent_guide with label_dim 0
    pixel_cond     seed 4  img_channels 3, model_channels 8, channels_per_head 8, num_blocks 2, dropout 0.1,
                           otherwise as latent_cond

Each NAME.pkl is `pickle.dump(data, f, protocol=4)` of the snapshot that training/training_loop.py writes:
`dnnlib.EasyDict(encoder=StabilityVAEEncoder() (latent_*) or StandardRGBEncoder() (pixel_cond),
dataset_kwargs=EasyDict(...), loss_fn=EDM2Loss(P_mean=-0.4, P_std=1.0))` with
`data.ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)`. reference.pt holds, from
the networks that `pickle.load` of those files gives back (EDM2's persistence, float16 weights):

    NAME/x, NAME/sigma, NAME/D_labels, NAME/D_nolabels   net(x, sigma, one-hot(labels)) and net(x, sigma, None)
        for x = randn (Generator seed 7, drawn in the order above) * (1 + sigma), sigma = [0.002, 0.3, 2, 80],
        labels = [3, 0, 9, 5] (D_labels of latent_uncond: its labels are ignored)
    sampler/*   generate_images.py edm_sampler, num_steps=4 (Heun, S_churn 0), on noise / labels drawn by its
        StackedRandomGenerator for seeds [11, 12, 13] (randn [3, 4, 8, 8], then randint(10)): `unguided`,
        `autoguidance` (gnet = latent_guide, guidance 2), `cfg_uncond_net` (gnet = latent_uncond, guidance 2:
        EDM2's CFG presets), each in dtype float32 (EDM2's default) and float64 (`_f64`); `pixel_unguided` on
        pixel_cond (randn [3, 3, 8, 8] for the same seeds) and `pixel_images`, its StandardRGBEncoder.decode.

Rerunning the generator reproduces the decoded weights and reference.pt exactly; the pickles' bytes differ only in
torch's legacy storage keys (object ids).
"""

from __future__ import annotations

import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch

from guidebench.backbones import edm as edm_loader
from guidebench.backbones import edm2
from guidebench.backbones.edm_pickle import ModuleRecord, UnsafePickleError, read_network_pickle, record_state_dict
from guidebench.checkpoints import CheckpointError
from guidebench.generate import to_uint8
from guidebench.guidance import AutoGuidance
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_heun
from guidebench.schedules import sigmas_karras
from tests.released_formats import edm2_release, write_edm2_pickle, write_edm_pickle, write_sd_vae

FIXTURES = Path(__file__).parent / "fixtures" / "edm2"
NETS = ("latent_cond", "latent_guide", "latent_uncond", "pixel_cond")
SEEDS = [11, 12, 13]
# Measured on torch 2.13 CPU: the forwards are bitwise equal. EDM2's sampler passes one sigma for the whole batch,
# so its noise embedding runs as a 1-row matmul where guidebench's per-sample sigma runs a 3-row one; those float32
# roundings (up to 1.5e-5 in one evaluation) accumulate over the 4 Heun steps to at most 1.5e-4 (|x| up to 17),
# against EDM2's float32 and float64 runs alike.
FORWARD_TOL = dict(atol=1e-5, rtol=1e-4)
SAMPLE_TOL = dict(atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURES / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def denoisers() -> dict:
    return {name: edm2.load_denoiser(FIXTURES / f"{name}.pkl") for name in NETS}


def test_fixture_pickles_decode_as_edm2_snapshots():
    for name in NETS:
        data = read_network_pickle(FIXTURES / f"{name}.pkl")
        assert sorted(data) == ["dataset_kwargs", "ema", "encoder", "loss_fn"]
        assert data["ema"].class_name == "Precond" and data["loss_fn"].class_name == "EDM2Loss"
        assert data["ema"].state["_modules"]["unet"].class_name == "UNet"
        assert {t.dtype for t in record_state_dict(data["ema"]).values()} == {torch.float16}
        encoder = data["encoder"]
        assert encoder.class_name == ("StandardRGBEncoder" if name == "pixel_cond" else "StabilityVAEEncoder")


@pytest.mark.parametrize("name", NETS)
def test_forward_matches_edm2(ref, denoisers, name):
    net = denoisers[name].net
    assert net.unet.out_gain.dtype == torch.float16  # kept as stored: EDM2's gains are float16 scalars
    onehot = torch.eye(10)[ref["labels"]] if net.label_dim else None
    with torch.no_grad():
        torch.testing.assert_close(net(ref[f"{name}/x"], ref[f"{name}/sigma"], onehot), ref[f"{name}/D_labels"],
                                   **FORWARD_TOL)
        torch.testing.assert_close(net(ref[f"{name}/x"], ref[f"{name}/sigma"], None), ref[f"{name}/D_nolabels"],
                                   **FORWARD_TOL)
    if net.label_dim:  # the labels matter
        assert (ref[f"{name}/D_labels"] - ref[f"{name}/D_nolabels"]).abs().max() > 1e-2


def test_adapter_takes_int_labels(ref, denoisers):
    den = denoisers["latent_cond"]
    assert (den.img_channels, den.img_resolution, den.num_classes) == (4, 8, 10)
    assert (den.sigma_min, den.sigma_max) == (0.002, 80.0)
    with torch.no_grad():
        out = den(ref["latent_cond/x"], ref["latent_cond/sigma"], ref["labels"]).x0
    torch.testing.assert_close(out, ref["latent_cond/D_labels"], **FORWARD_TOL)


def test_seeds_draw_edm2s_noise_and_labels(ref):
    rng = StackedRandomGenerator("cpu", SEEDS)
    torch.testing.assert_close(rng.randn([3, 4, 8, 8]), ref["sampler/noise"], atol=0, rtol=0)
    torch.testing.assert_close(rng.randint(10, size=[3]), ref["sampler/labels"], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["", "_f64"])
@pytest.mark.parametrize("case,guide", [("unguided", None), ("autoguidance", "latent_guide"),
                                        ("cfg_uncond_net", "latent_uncond")])
def test_heun_with_guidance_matches_edm2_sampler(ref, denoisers, case, guide, dtype):
    den = denoisers["latent_cond"]
    guidance = AutoGuidance(denoisers[guide], scale=2.0) if guide else None
    if guidance is not None:
        guidance.check(den)
    sigmas = sigmas_karras(den, num_steps=4)
    with torch.no_grad():
        x = sample_heun(den, ref["sampler/noise"].double() * sigmas[0], sigmas, ref["sampler/labels"],
                        guidance=guidance)
    expected = ref[f"sampler/{case}{dtype}"]
    torch.testing.assert_close(x.to(expected.dtype), expected, **SAMPLE_TOL)


def test_pixel_model_samples_and_uint8_as_edm2(ref, denoisers):
    den = denoisers["pixel_cond"]
    sigmas = sigmas_karras(den, num_steps=4)
    with torch.no_grad():
        x = sample_heun(den, ref["sampler/pixel_noise"].double() * sigmas[0], sigmas, ref["sampler/labels"])
    torch.testing.assert_close(x.float(), ref["sampler/pixel_unguided"], **SAMPLE_TOL)
    # StandardRGBEncoder.decode is guidebench's edm rule
    expected = ref["sampler/pixel_images"].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(to_uint8(ref["sampler/pixel_unguided"], "edm"), expected)


def _tampered(path: Path) -> bytes:
    """The pickle with an extra global (posix.system) pushed and popped before STOP."""
    data = path.read_bytes()
    assert data.endswith(b".")
    return data[:-1] + b"\x8c\x05posix\x8c\x06system\x93" + b"0."


def test_a_tampered_pickle_is_refused(tmp_path):
    path = tmp_path / "tampered.pkl"
    path.write_bytes(_tampered(FIXTURES / "latent_cond.pkl"))
    with pytest.raises(UnsafePickleError, match="refusing global posix.system"):
        edm2.load_network(path)


def test_wrong_files_are_named(tmp_path):
    missing = tmp_path / "edm2-img512-s-2147483-0.070.pkl"
    with pytest.raises(CheckpointError, match=edm2.RELEASE_URL + missing.name):
        edm2.load_denoiser(missing)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    with pytest.raises(CheckpointError, match="cannot read .* as an NVlabs/edm or edm2 network pickle"):
        edm2.load_network(tmp_path / "state_dict.pt")
    with pytest.raises(CheckpointError, match="no network under key 'model'.*found \\['dataset_kwargs', 'ema'"):
        edm2.load_network(FIXTURES / "latent_cond.pkl", key="model")
    with pytest.raises(CheckpointError, match="holds EDM2Loss, not EDM2's Precond"):
        edm2.load_network(FIXTURES / "latent_cond.pkl", key="loss_fn")
    edm = write_edm_pickle(tmp_path / "edm.pkl", init_kwargs=dict(
        img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1], num_blocks=1,
        attn_resolutions=[]))
    with pytest.raises(CheckpointError, match="holds EDMPrecond, not EDM2's Precond .*guidebench.backbones.edm"):
        edm2.load_network(edm)
    with pytest.raises(CheckpointError, match=r"holds Precond, not EDM's EDMPrecond or iDDPMPrecond \(an NVlabs/edm2 "
                                              r"pickle: use guidebench.backbones.edm2\)"):
        edm_loader.load_network(FIXTURES / "pixel_cond.pkl")


def _globals(path: Path) -> set[tuple[str, str]]:
    """The (module, name) pairs a protocol-4 pickle imports (STACK_GLOBAL after two strings)."""
    strings, found = [], set()
    for op, arg, _ in pickletools.genops(path.read_bytes()):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE"):
            strings = [*strings[-1:], arg]
        elif op.name == "STACK_GLOBAL":
            found.add(tuple(strings))
        elif op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
            strings = []
    return found


def _layout(obj) -> object:
    """Class names, state keys, plain values and tensor dtypes / shapes of a decoded pickle, without the numbers."""
    if isinstance(obj, ModuleRecord):
        return (obj.class_name, {k: _layout(v) for k, v in obj.state.items()})
    if isinstance(obj, dict):
        return {k: _layout(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.dtype, tuple(obj.shape))
    if hasattr(obj, "array"):
        return ("ndarray", obj.array.dtype, obj.array.shape)
    return type(obj).__name__


@pytest.mark.parametrize("name", ["latent_cond", "pixel_cond"])
def test_emulated_release_pickle_has_the_layout_of_edm2s_own(tmp_path, name):
    """tests/released_formats.py's write_edm2_pickle (the smoke runs' stand-in for EDM2's releases) writes what
    EDM2's own pickling wrote: the same globals, records, state keys, dtypes and shapes."""
    real = FIXTURES / f"{name}.pkl"
    kwargs = read_network_pickle(real)["ema"].state["_init_kwargs"]
    emulated = write_edm2_pickle(tmp_path / f"{name}.pkl", kwargs, seed=5)
    assert _globals(emulated) == _globals(real)
    real_data, emulated_data = read_network_pickle(real), read_network_pickle(emulated)
    assert _layout(emulated_data["ema"]) == _layout(real_data["ema"])
    assert _layout(emulated_data["encoder"]) == _layout(real_data["encoder"])
    assert sorted(emulated_data) == sorted(real_data)
    assert _layout(emulated_data["loss_fn"]) == _layout(real_data["loss_fn"])
    edm2.load_network(emulated)


def test_latent_decoding_is_stability_vae_decode(tmp_path):
    """EDM2's StabilityVAEEncoder.decode: z -> (z - bias) / scale -> vae.decode -> clamp(0, 1) * 255 -> uint8, with
    scale = float32(0.5) / float32(raw_std), bias = -float32(raw_mean) * scale, computed here from the formula."""
    from diffusers import AutoencoderKL

    folder = write_sd_vae(tmp_path / "sd-vae-ft-mse", seed=0, block_out_channels=(8, 8), layers_per_block=1,
                          norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2)
    decoder = edm2.load_decoder(folder)
    scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
    bias = np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale
    encoder = read_network_pickle(FIXTURES / "latent_cond.pkl")["encoder"].state  # what EDM2 pickles record
    np.testing.assert_array_equal(encoder["scale"].array, scale)
    np.testing.assert_array_equal(encoder["bias"].array, bias)

    vae = AutoencoderKL.from_pretrained(folder).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    with torch.no_grad():
        y = vae.decode((z - torch.from_numpy(bias).reshape(1, -1, 1, 1)) / torch.from_numpy(scale).reshape(1, -1, 1, 1))
        expected = y.sample.clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images = decoder(z)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert 0 < (expected == 0).mean() < 0.9 and (expected == 255).mean() < 0.9  # not all clipped
    np.testing.assert_array_equal(to_uint8(images, "edm2_vae"), expected)


@pytest.mark.parametrize("size,millions", [("xs", 125), ("s", 280), ("m", 498), ("xxl", 1523)])
def test_released_sizes_have_the_papers_parameter_counts(size, millions):
    """Karras et al. 2024, Table 2 (ImageNet-512, Mparams) for the architectures the released names stand for."""
    with torch.device("meta"):
        net = edm2.Precond(**edm2_release(f"edm2-img512-{size}-2147483-0.100.pkl"))
    assert round(sum(p.numel() for p in net.parameters()) / 1e6) == millions
