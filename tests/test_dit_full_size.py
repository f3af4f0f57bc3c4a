"""Full-size DiT architectures (Peebles & Xie 2023) and the shipped DiT / timm configs."""

from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from guidebench.backbones.dit import DIT_MODELS, DiT, architecture, load_denoiser
from guidebench.checkpoints import CheckpointError

CONF = Path(__file__).resolve().parents[1] / "conf"
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}  # DiT paper, Table 1 (millions)


def meta_dit(name, image_size=256):
    with torch.device("meta"):
        return DiT(**architecture(name, image_size))


def numel(tensors):
    return sum(t.numel() for t in tensors)


def test_xl2_has_the_released_parameter_count(capsys):
    """DiT's count (train.py) includes the frozen pos_embed, which is also in the released file."""
    net = meta_dit("DiT-XL/2", 256)
    with capsys.disabled():
        print(f"\nDiT-XL/2 256: {numel(net.state_dict().values()):,} parameters (pos_embed included)", end="")
    assert numel(net.state_dict().values()) == 675_129_632
    assert numel(net.parameters()) == 675_129_632 - 256 * 1152
    assert numel(meta_dit("DiT-XL/2", 512).state_dict().values()) == 675_129_632 + (1024 - 256) * 1152


@pytest.mark.parametrize("name", sorted(DIT_MODELS))
def test_model_table_matches_paper_sizes(name):
    size = name.split("-")[1].split("/")[0]
    assert abs(numel(meta_dit(name).state_dict().values()) / 1e6 - PAPER_PARAMS_M[size]) < 1


def test_xl2_state_dict_layout_is_the_released_one():
    sd = meta_dit("DiT-XL/2", 256).state_dict()
    block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
    layers = (["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
               "final_layer.adaLN_modulation.1"] + [f"blocks.{i}.{b}" for i in range(28) for b in block])
    expected = {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}
    assert set(sd) == expected | {"pos_embed", "y_embedder.embedding_table.weight"}
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)  # last row: the null class
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 1152)
    assert sd["blocks.27.adaLN_modulation.1.weight"].shape == (6 * 1152, 1152)


@pytest.mark.slow
def test_xl2_forward_shapes():
    torch.manual_seed(0)
    net = DiT(**architecture("DiT-XL/2", 256)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 4, 32, 32), torch.tensor([999]), torch.tensor([1000]))
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()


def test_missing_released_checkpoint_names_file_and_url(tmp_path):
    path = tmp_path / "DiT-XL-2-256x256.pt"
    with pytest.raises(CheckpointError) as err:
        load_denoiser(path)
    assert str(path) in str(err.value)
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in str(err.value)


def instantiate_error(cfg) -> str:
    """The CheckpointError message hydra wraps when instantiating `cfg` fails."""
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg)
    assert isinstance(err.value.__cause__, CheckpointError)
    return str(err.value.__cause__)


def compose(group, name, tmp_path):
    cfg = OmegaConf.create({"paths": {"checkpoints": str(tmp_path)}, group: OmegaConf.load(CONF / group / f"{name}.yaml")})
    return cfg[group]


@pytest.mark.parametrize("res", [256, 512])
def test_dit_backbone_configs_point_at_released_files(res, tmp_path):
    cfg = compose("backbone", f"dit_xl_2_{res}", tmp_path)
    assert cfg.image_size == res and cfg.denoiser.image_size == res and cfg.num_classes == 1000
    msg = instantiate_error(cfg.denoiser)
    assert f"{tmp_path}/dit/DiT-XL-2-{res}x{res}.pt" in msg
    assert f"https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{res}x{res}.pt" in msg
    msg = instantiate_error(cfg.decoder)
    assert f"{tmp_path}/vae/sd-vae-ft-ema" in msg and "huggingface.co/stabilityai/sd-vae-ft-ema" in msg


def test_cfg_dit_preset_is_dits_quirk():
    cfg = instantiate(OmegaConf.load(CONF / "guidance" / "cfg_dit.yaml"))
    assert (cfg.scale, cfg.channels) == (1.5, 3)


@pytest.mark.parametrize("name,url", [("resnet50", "resnet50-11ad3fa6.pth"), ("resnet101", "resnet101-cd907fc2.pth")])
def test_timm_classifier_configs_point_at_released_files(name, url, tmp_path):
    msg = instantiate_error(compose("classifier", name, tmp_path))
    assert f"{tmp_path}/timm/{name}.tv2_in1k.pth" in msg and f"https://download.pytorch.org/models/{url}" in msg


def test_label_dropout_in_training_maps_to_the_null_class():
    from guidebench.backbones.dit import LabelEmbedder

    emb = LabelEmbedder(10, 8, dropout_prob=1.0)
    labels = torch.arange(10)
    null = emb.embedding_table.weight[10].expand(10, 8)
    assert torch.equal(emb.train()(labels), null)
    assert torch.equal(emb.eval()(labels), emb.embedding_table.weight[:10])
    assert LabelEmbedder(10, 8, dropout_prob=0.0).embedding_table.num_embeddings == 10


def test_cfg_channels_option_is_validated():
    from types import SimpleNamespace

    from guidebench.guidance import ClassifierFreeGuidance

    with pytest.raises(ValueError, match="positive channel count"):
        ClassifierFreeGuidance(1.5, channels=0)
    with pytest.raises(ValueError, match="channels=5 exceeds the backbone's 4 channels"):
        ClassifierFreeGuidance(1.5, channels=5).check(SimpleNamespace(null_label=1000, img_channels=4))
