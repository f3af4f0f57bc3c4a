"""EluCD's ReLU -> Softplus(beta) swap and its torchvision classifiers, on random weights (no downloads)."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
import torchvision
from hydra.errors import InstantiationException
from torch import nn
from torchvision.models.resnet import BasicBlock

from guidebench.checkpoints import CheckpointError
from guidebench.classifiers.digits import load_clean_classifier
from guidebench.classifiers.softplus import swap_relu_for_softplus
from guidebench.classifiers.torchvision_resnet import load_classifier
from guidebench.config import REPO_ROOT
from guidebench.data.digits import load_digits_split
from guidebench.training.common import accuracy


def count(net: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


def images(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_swap_rule_keeps_basicblock_relus():
    """EluCD swaps top-level and Bottleneck ReLUs only: resnet18's BasicBlocks keep theirs."""
    net = torchvision.models.resnet18()
    assert swap_relu_for_softplus(net, 3.0) is net
    assert isinstance(net.relu, nn.Softplus) and net.relu.beta == 3.0 and net.relu.threshold == 20
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(isinstance(b.relu, nn.ReLU) for b in blocks)
    assert (count(net, nn.ReLU), count(net, nn.Softplus)) == (8, 1)

    net = torchvision.models.resnet50()   # Bottlenecks: one shared relu each, all swapped
    swap_relu_for_softplus(net, 2.0)
    assert (count(net, nn.ReLU), count(net, nn.Softplus)) == (0, 1 + sum(len(getattr(net, f"layer{i}"))
                                                                           for i in range(1, 5)))

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True)))
    swap_relu_for_softplus(net, 5.0)
    assert (count(net, nn.ReLU), count(net, nn.Softplus)) == (0, 2)


@pytest.mark.parametrize("beta", [None, math.inf])
def test_no_swap_for_none_or_inf(beta):
    net = torchvision.models.resnet18()
    swap_relu_for_softplus(net, beta)
    assert count(net, nn.Softplus) == 0


@pytest.mark.parametrize("beta", [0.0, -1.0, math.nan, -math.inf])
def test_invalid_beta_names_the_config_key(beta):
    with pytest.raises(ValueError, match=r"classifier\.softplus_beta"):
        swap_relu_for_softplus(nn.Sequential(nn.ReLU()), beta)


def test_load_classifier_feeds_x_as_is(tmp_path):
    """torchvision resnet50 + strict state dict; logits of x itself (no resize, no normalisation)."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet50().eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}   # as V1 files
    torch.save(state, tmp_path / "resnet50_weight_V2.pth")
    clf = load_classifier("resnet50", checkpoint=tmp_path / "resnet50_weight_V2.pth")
    x = images((2, 3, 32, 32))
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(clf(x, torch.full((2,), 7.0)), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clf(x.double(), None), expected, atol=1e-5, rtol=1e-5)
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())

    smooth = load_classifier("resnet50", checkpoint=tmp_path / "resnet50_weight_V2.pth", softplus_beta=3.0)
    assert count(smooth, nn.ReLU) == 0 and count(smooth, nn.Softplus) == 17
    xg = x.clone().requires_grad_(True)
    torch.log_softmax(smooth(xg, None), -1)[:, 3].sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_missing_wrong_file_or_arch_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing file .*resnet101_weight_V2\.pth \(set classifier\.checkpoint"
                                              r"=PATH\).*download\.pytorch\.org/models/resnet101-cd907fc2\.pth"):
        load_classifier("resnet101", checkpoint=tmp_path / "resnet101_weight_V2.pth")
    with pytest.raises(CheckpointError, match=r"resnet50-11ad3fa6\.pth"):
        load_classifier("resnet50", checkpoint=tmp_path / "resnet50_weight_V2.pth")
    with pytest.raises(ValueError, match=r"'resnet18'.*\['resnet101', 'resnet50'\]"):
        load_classifier("resnet18", checkpoint=tmp_path / "r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"r18\.pth does not fit ResNet .*resnet50.*shape mismatches"):
        load_classifier("resnet50", checkpoint=tmp_path / "r18.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_classifier("resnet50", checkpoint=tmp_path / "tensor.pth")


@pytest.mark.parametrize("name", ["tv_resnet50", "tv_resnet101"])
def test_config_loads_or_names_the_missing_weights(compose_cfg, name):
    cfg = compose_cfg("sample", [f"classifier={name}", "classifier.softplus_beta=3.0"])
    arch = cfg.classifier.arch
    if not Path(cfg.classifier.checkpoint).exists():
        with pytest.raises((CheckpointError, InstantiationException),
                           match=rf"missing file .*{arch}_weight_V2\.pth.*download\.pytorch\.org/models/{arch}-"):
            hydra.utils.instantiate(cfg.classifier)
        return
    clf = hydra.utils.instantiate(cfg.classifier)
    assert count(clf, nn.ReLU) == 0 and clf(images((1, 3, 64, 64)), None).shape == (1, 1000)


def test_timm_classifier_softplus_swap(tmp_path):
    timm = pytest.importorskip("timm")
    from guidebench.classifiers.timm_classifier import load_classifier as load_timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18.tv_in1k", pretrained=False)
    relus = count(model, nn.ReLU)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    plain = load_timm("resnet18.tv_in1k", tmp_path / "w.pth")
    smooth = load_timm("resnet18.tv_in1k", tmp_path / "w.pth", softplus_beta=4.0)
    assert relus > 0 and count(plain, nn.Softplus) == 0
    assert (count(smooth, nn.ReLU), count(smooth, nn.Softplus)) == (0, relus)
    x = images((1, 3, 64, 64))
    with torch.no_grad():
        assert not torch.allclose(smooth(x, None), plain(x, None))


def test_digits_clean_classifier_softplus_tends_to_relu():
    """Softplus(beta) -> ReLU as beta grows: the shipped ReLU classifier's logits move less and less."""
    path = REPO_ROOT / "checkpoints" / "digits" / "clean_classifier.pt"
    heldout = load_digits_split("heldout")
    plain = load_clean_classifier(path)
    assert count(plain, nn.ReLU) == 4 and count(plain, nn.Softplus) == 0
    with torch.no_grad():
        ref = plain(heldout.images, None)
        diffs = {}
        for beta in (5.0, 50.0, 200.0):
            net = load_clean_classifier(path, softplus_beta=beta)
            assert count(net, nn.ReLU) == 0 and count(net, nn.Softplus) == 4 and not net.training
            diffs[beta] = float((net(heldout.images, None) - ref).abs().max())
    assert 0 < diffs[200.0] < diffs[50.0] < diffs[5.0], diffs
    assert diffs[50.0] < 0.01 * float(ref.abs().max()), diffs
    smooth = load_clean_classifier(path, softplus_beta=50.0)
    assert accuracy(lambda v: smooth(v, None), heldout.images, heldout.labels) == pytest.approx(
        accuracy(lambda v: plain(v, None), heldout.images, heldout.labels), abs=0.004)
