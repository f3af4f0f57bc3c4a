"""EluCD's off-the-shelf classifier against numbers made by AlexMaOLS/EluCD itself (elucd_classifier.pt).

The fixture stands in for torchvision's resnet101 with a small Bottleneck ResNet (`fixture_arch`). It is
rebuilt, loaded through guidebench's torchvision weights loader and wrapped as load_classifier wraps
resnet50/101, with plain ReLU and with EluCD's ReLU -> Softplus(beta) swap for every stored beta.
Tolerance: golden README-elucd, sec. 6 (classifier logits atol 2e-5).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.resnet import ResNet

from guidebench.classifiers.torchvision_resnet import TorchvisionClassifier, load_weights
from tests.golden import elucd_fixture_resnet, load_golden

pytestmark = pytest.mark.golden

LOGITS = dict(atol=2e-5, rtol=1e-5)
@pytest.fixture(scope="module")
def golden() -> dict:
    return load_golden("elucd_classifier.pt")


@pytest.fixture(scope="module")
def weights_file(golden, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("elucd") / "resnet101_weight_V2.pth"
    torch.save(golden["state_dict"], path)
    return path


def fixture_net(golden: dict, weights_file: Path) -> ResNet:
    net = elucd_fixture_resnet(golden)
    load_weights(net, weights_file, "golden elucd_classifier.pt")
    return net


def count(net: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


def test_relu_logits(golden, weights_file):
    checks = golden["checks"]
    clf = TorchvisionClassifier(fixture_net(golden, weights_file))
    assert list(clf.net.state_dict()) == list(golden["state_dict"])
    assert count(clf.net, nn.Softplus) == 0 and count(clf.net, nn.ReLU) == 1 + sum(golden["fixture_arch"]["layers"])
    with torch.no_grad():
        for res in ("x64", "x16"):
            x = checks[res]
            torch.testing.assert_close(clf(x, None), checks[f"logits_relu_{res}"], **LOGITS)
            assert torch.equal(clf(x, torch.full((len(x),), 5.0)), clf(x, None))   # sigma is ignored


def test_softplus_logits_and_swap_rule(golden, weights_file):
    checks, layers = golden["checks"], golden["fixture_arch"]["layers"]
    assert checks["softplus"]
    for entry in checks["softplus"]:
        net = fixture_net(golden, weights_file)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        clf = TorchvisionClassifier(net, softplus_beta=entry["beta"])
        # one shared relu per Bottleneck (used three times) plus the stem's
        assert count(clf.net, nn.ReLU) == 0 and count(clf.net, nn.Softplus) == 1 + sum(layers)
        assert all(m.beta == entry["beta"] and m.threshold == 20 for m in clf.net.modules()
                   if isinstance(m, nn.Softplus))
        after = clf.net.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
        with torch.no_grad():
            for res in ("x64", "x16"):
                torch.testing.assert_close(clf(checks[res], None), entry[f"logits_{res}"], **LOGITS,
                                           msg=lambda m: f"beta {entry['beta']}, {res}: {m}")


def test_eval_mode_uses_batchnorm_running_statistics(golden, weights_file):
    checks, init = golden["checks"], golden["init"]
    clf = TorchvisionClassifier(fixture_net(golden, weights_file))
    norms = [m for m in clf.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in clf.modules())
    assert all(int(m.num_batches_tracked) == init["bn_calib_batches"] for m in norms)
    assert not any(p.requires_grad for p in clf.parameters())
    stats = [m.running_mean.clone() for m in norms]
    x = checks["x64"].clone().requires_grad_(True)
    logits = clf(x, None)
    logits.logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats))
    # with default statistics (a loader that drops the BN buffers) the logits are far off
    reset = copy.deepcopy(clf)
    for m in reset.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    with torch.no_grad():
        assert (reset(checks["x64"], None) - checks["logits_relu_x64"]).abs().max() > 1e3 * LOGITS["atol"]
