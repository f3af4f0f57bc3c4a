"""ED-DPM's entropy-constraint loss (guidebench.training.ect) without fixtures: weight checks, lam = 0, sign."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from guidebench.cli.train import train
from guidebench.config import CONF_DIR
from guidebench.training.classifiers import train_noisy_classifier
from guidebench.training.ect import ect_loss


def batch(seed: int = 0, b: int = 16, c: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(b, c, generator=gen), torch.randint(0, c, (b,), generator=gen)


@pytest.mark.parametrize("lam", [-0.1, -1e-12, float("nan")])
def test_negative_or_nan_weight_is_refused(lam):
    logits, labels = batch()
    with pytest.raises(ValueError, match=r"train\.ect_lambda"):
        ect_loss(logits, labels, lam)
    with pytest.raises(ValueError, match=r"train\.ect_lambda"):   # before any data or model is made
        train_noisy_classifier({}, {"ect_lambda": lam})


def test_cli_refuses_negative_weight(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=["task=noisy_classifier", "train.ect_lambda=-0.1", f"out={tmp_path}/c.pt"])
    with pytest.raises(ValueError, match=r"train\.ect_lambda=-0\.1 must be >= 0"):
        train(cfg)
    assert not (tmp_path / "c.pt").exists()


def test_zero_weight_is_exactly_cross_entropy():
    logits, labels = batch()
    z0, z1 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss = ect_loss(z0, labels, 0.0)["loss"]
    ref = F.cross_entropy(z1, labels)
    loss.backward()
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(z0.grad, z1.grad)


def test_terms_and_num_classes():
    logits, labels = batch()
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    terms = ect_loss(logits, labels, 0.3)
    torch.testing.assert_close(terms["entropy_term"], math.log(10) - entropy)   # KL(p || U) >= 0
    assert torch.all(terms["entropy_term"] >= 0)
    torch.testing.assert_close(terms["loss_per_sample"], F.cross_entropy(logits, labels, reduction="none")
                               + 0.3 * terms["entropy_term"])
    torch.testing.assert_close(terms["loss"], terms["loss_per_sample"].mean())
    # ED-DPM hard-codes ln 1000: the term shifts by the constant ln(1000 / C)
    shifted = ect_loss(logits, labels, 0.3, num_classes=1000)["entropy_term"]
    torch.testing.assert_close(shifted, terms["entropy_term"] + math.log(100))


def test_minimising_the_term_raises_entropy():
    """Gradient descent on lam (ln C - H) alone (CE's gradient removed) makes predictions less confident."""
    logits, labels = batch()
    z = logits.clone().requires_grad_(True)
    terms = ect_loss(z, labels, 1.0)
    terms["entropy_constraint_loss"].mean().backward()
    before = math.log(10) - terms["entropy_term"].detach()
    after = math.log(10) - ect_loss(z.detach() - 0.5 * z.grad, labels, 1.0)["entropy_term"]
    assert torch.all(after > before)
    # and the full loss pulls the same way as CE alone, less sharply: lam > 0 lowers the optimal confidence
    z = torch.zeros(1, 10, requires_grad=True)
    opt = torch.optim.SGD([z], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        ect_loss(z, torch.tensor([3]), 0.5)["loss"].backward()
        opt.step()
    p = z.detach().softmax(-1)[0, 3]
    assert 0.5 < p < 0.99   # CE alone drives p -> 1
