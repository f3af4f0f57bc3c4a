"""The released ADM configurations (conf/backbone/adm_*.yaml, conf/classifier/adm_*.yaml) and checkpoint errors.

Parameter counts were taken from openai/guided-diffusion@22e0df8 itself (script_util.create_model /
create_classifier with the README flags; same state-dict names and shapes as ours). They agree with the
sizes Dhariwal & Nichol 2021 report (e.g. 559M for ImageNet 512x512).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from guidebench.backbones.adm import RELEASE_URL, create_classifier, create_unet, load_denoiser
from guidebench.checkpoints import CheckpointError
from guidebench.classifiers.adm import load_classifier

CONF = Path(__file__).resolve().parents[1] / "conf"
BACKBONE_PARAMS = {
    "adm_64": 295_904_454,
    "adm_128": 421_529_606,
    "adm_256": 553_838_086,
    "adm_256_uncond": 552_814_086,
    "adm_512": 558_997_638,
}
CLASSIFIER_PARAMS = {
    "adm_64": 65_438_568,
    "adm_128": 42_568_040,
    "adm_256": 54_096_360,
    "adm_512": 54_448_360,
}
FILES = {
    ("backbone", "adm_64"): "64x64_diffusion.pt",
    ("backbone", "adm_128"): "128x128_diffusion.pt",
    ("backbone", "adm_256"): "256x256_diffusion.pt",
    ("backbone", "adm_256_uncond"): "256x256_diffusion_uncond.pt",
    ("backbone", "adm_512"): "512x512_diffusion.pt",
    ("classifier", "adm_64"): "64x64_classifier.pt",
    ("classifier", "adm_128"): "128x128_classifier.pt",
    ("classifier", "adm_256"): "256x256_classifier.pt",
    ("classifier", "adm_512"): "512x512_classifier.pt",
}
LOADER_ONLY = ("_target_", "checkpoint", "dtype", "clip_x0", "sha256")
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
            num_head_channels=32, class_cond=True, learn_sigma=True)


def yaml_flags(group: str, name: str) -> dict:
    cfg = OmegaConf.load(CONF / group / f"{name}.yaml")
    node = cfg.denoiser if group == "backbone" else cfg
    return {k: v for k, v in OmegaConf.to_container(node).items() if k not in LOADER_ONLY}


def test_parameter_counts(capsys):
    """Every released configuration builds with exactly the released number of parameters."""
    counts = {}
    with torch.device("meta"):
        for name, expected in BACKBONE_PARAMS.items():
            counts["backbone", name] = (sum(p.numel() for p in create_unet(yaml_flags("backbone", name)).parameters()),
                                        expected)
        for name, expected in CLASSIFIER_PARAMS.items():
            counts["classifier", name] = (
                sum(p.numel() for p in create_classifier(yaml_flags("classifier", name)).parameters()), expected)
    with capsys.disabled():
        for key, (n, expected) in counts.items():
            print(f"\n{key[0]}/{key[1]}: {n:,} parameters", end="")
    assert {k: n for k, (n, _) in counts.items()} == {k: e for k, (_, e) in counts.items()}


def _forward_shape(group: str, name: str) -> None:
    flags = yaml_flags(group, name)
    size = flags["image_size"]
    x, t = torch.randn(1, 3, size, size), torch.tensor([500])
    with torch.no_grad():
        if group == "backbone":
            out, shape = create_unet(flags)(x, t, torch.tensor([207])), (1, 6, size, size)
        else:
            out, shape = create_classifier(flags)(x, t), (1, 1000)
    assert out.shape == shape and out.dtype == torch.float32 and out.isfinite().all()


@pytest.mark.parametrize("name", ["adm_64"])
def test_classifier_forward_quick(name):
    _forward_shape("classifier", name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adm_128", "adm_256", "adm_512"])
def test_classifier_forward(name):
    _forward_shape("classifier", name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONE_PARAMS))
def test_backbone_forward(name):
    _forward_shape("backbone", name)


@pytest.mark.parametrize("group,name", [*(("backbone", n) for n in BACKBONE_PARAMS),
                                        *(("classifier", n) for n in CLASSIFIER_PARAMS)])
def test_config_missing_checkpoint_names_download(group, name, tmp_path):
    """Instantiating a config without its file fails at once, naming the path, the config key and the URL."""
    cfg = OmegaConf.create({"paths": {"checkpoints": str(tmp_path)},
                            group: OmegaConf.load(CONF / group / f"{name}.yaml")})
    node = cfg[group].denoiser if group == "backbone" else cfg[group]
    with pytest.raises(InstantiationException) as err:
        instantiate(node)
    assert isinstance(err.value.__cause__, CheckpointError)
    msg, file = str(err.value.__cause__), FILES[group, name]
    assert str(tmp_path / "adm" / file) in msg and RELEASE_URL + file in msg
    assert ("backbone.denoiser.checkpoint" if group == "backbone" else "classifier.checkpoint") in msg


@pytest.fixture
def tiny_state() -> dict[str, torch.Tensor]:
    return create_unet(TINY).state_dict()


def test_tiny_checkpoint_round_trip(tiny_state, tmp_path):
    path = tmp_path / "64x64_diffusion.pt"
    torch.save(tiny_state, path)
    den = load_denoiser(path, **TINY)
    for k, v in den.net.state_dict().items():
        assert torch.equal(v, tiny_state[k]), k


def test_pinned_sha256_is_checked(tiny_state, tmp_path):
    path = tmp_path / "64x64_diffusion.pt"
    torch.save(tiny_state, path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    load_denoiser(path, sha256=actual, **TINY)
    with pytest.raises(CheckpointError, match=f"sha256 {actual} but expected {'0' * 64}") as err:
        load_denoiser(path, sha256="0" * 64, **TINY)
    assert str(path) in str(err.value) and RELEASE_URL in str(err.value)


def test_wrong_shape_names_key_and_shapes(tiny_state, tmp_path):
    path = tmp_path / "64x64_diffusion.pt"
    torch.save({**tiny_state, "out.2.weight": torch.zeros(3, 32, 3, 3)}, path)
    with pytest.raises(CheckpointError) as err:
        load_denoiser(path, **TINY)
    msg = str(err.value)
    assert str(path) in msg and "out.2.weight: file (3, 32, 3, 3) vs model (6, 32, 3, 3)" in msg
    assert RELEASE_URL + "64x64_diffusion.pt" in msg


def test_unexpected_and_missing_keys(tiny_state, tmp_path):
    """A class-conditional file loaded as unconditional: label_emb is unexpected; a dropped key is missing."""
    state = dict(tiny_state)
    del state["middle_block.1.qkv.weight"]
    path = tmp_path / "custom.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_denoiser(path, **{**TINY, "class_cond": False})
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys: middle_block.1.qkv.weight" in msg and "unexpected keys: label_emb.weight" in msg


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_unreadable_or_not_a_state_dict(content, tmp_path):
    path = tmp_path / "64x64_classifier.pt"
    if content is None:
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_classifier(path, **yaml_flags("classifier", "adm_64"))


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its initial value (ADM zero-initialises residual branches and the output)."""
    gen = torch.Generator().manual_seed(0)
    for p in net.parameters():
        p.data += 0.1 * torch.randn(p.shape, generator=gen)
    return net


@torch.no_grad()
def test_fresh_unet_predicts_zero():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    assert torch.equal(create_unet(TINY)(x, t, torch.tensor([1, 2])), torch.zeros(2, 6, 16, 16))


@torch.no_grad()
def test_labels_condition_only_class_conditional_models():
    """ADM-U ignores labels (classifier_sample.py passes y=None to it); ADM-G uses and requires them."""
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    y, other = torch.tensor([1, 2]), torch.tensor([3, 4])
    uncond = perturbed(create_unet({**TINY, "class_cond": False}))
    assert torch.equal(uncond(x, t, y), uncond(x, t, None))
    cond = perturbed(create_unet(TINY))
    assert not torch.allclose(cond(x, t, y), cond(x, t, other))
    with pytest.raises(ValueError, match="labels"):
        cond(x, t, None)


def test_bad_flags_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_chanels"):
        create_unet({**TINY, "num_chanels": 64})
    with pytest.raises(ValueError, match="sampler.schedule.respacing"):
        load_denoiser(tmp_path / "x.pt", **TINY, timestep_respacing="250")
    with pytest.raises(ValueError, match="classifier_pool"):
        create_classifier({"classifier_pool": "adaptive"})
    with pytest.raises(ValueError, match="bf16"):
        load_denoiser(tmp_path / "x.pt", **TINY, dtype="bf16")
