"""ED-DPM's entropy-constraint training against one iteration of ZGCTroy/ED-DPM classifier_train_ECT.py (eddpm_ect.pt).

The classifier is adm_classifier.pt rebuilt by guidebench's own `create_classifier`; the loss is
`guidebench.training.ect.ect_loss`, L = mean_i [CE_i + lam (ln C - H(p_i))], C = the fixture's num_classes.
Every size and setting (lam, num_classes, batch, optimizer) is read from the fixture.
Tolerances: golden README-eddpm.md (losses rtol 1e-5 / atol 1e-6; gradients atol 1e-6 + rtol 1e-4).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from guidebench.backbones.adm import CLASSIFIER_DEFAULTS, DIFFUSION_DEFAULTS, NUM_CLASSES, create_classifier
from guidebench.checkpoints import load_state_dict_checked
from guidebench.denoisers.discrete_vp import betas_for_schedule
from guidebench.training.ect import ect_loss
from tests.golden import load_golden

pytestmark = pytest.mark.golden

LOSS = dict(rtol=1e-5, atol=1e-6)
GRAD = dict(rtol=1e-4, atol=1e-6)
TERMS = ("ce_loss", "entropy_term", "entropy_constraint_loss", "loss_per_sample", "loss")
FIRST_CONV = "input_blocks.0.0"


@pytest.fixture(scope="module")
def ect() -> dict:
    return load_golden("eddpm_ect.pt")


@pytest.fixture(scope="module")
def classifier_golden() -> dict:
    return load_golden("adm_classifier.pt")


def adm_flags(ect: dict, classifier_golden: dict) -> dict:
    """guided-diffusion's part of ED-DPM's classifier flags; its extra ones must be what ADM hard-codes."""
    flags = {k: v for k, v in ect["classifier_flags"].items() if k in {**CLASSIFIER_DEFAULTS, **DIFFUSION_DEFAULTS}}
    extra = ect["classifier_flags"]
    assert flags == classifier_golden["flags"]
    assert (extra["classifier_out_channel"], extra["classifier_num_head_channels"], extra["dropout"]) == (
        NUM_CLASSES, 64, 0.0)
    return flags


def make_classifier(ect: dict, classifier_golden: dict) -> torch.nn.Module:
    """A fresh golden classifier in train mode (as the script trains it; dropout 0, so equal to eval)."""
    net = create_classifier(adm_flags(ect, classifier_golden))
    load_state_dict_checked(net, classifier_golden["state_dict"], path="adm_classifier.pt", source="golden")
    torch.testing.assert_close(net.state_dict()[f"{FIRST_CONV}.weight"], ect["first_conv_weight"], rtol=0, atol=0)
    return net.train()


def test_x0_from_uint8(ect):
    x0 = (ect["x0_uint8"].to(torch.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    torch.testing.assert_close(x0, ect["x_0"], rtol=0, atol=1e-6)


def test_q_sample(ect, classifier_golden):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, coefficients cast to float32 as `_extract_into_tensor` does."""
    flags = {**DIFFUSION_DEFAULTS, **adm_flags(ect, classifier_golden)}
    abar = torch.cumprod(1 - betas_for_schedule(flags["noise_schedule"], flags["diffusion_steps"]), 0)[ect["t"]]
    c0, c1 = (v.float().reshape(-1, 1, 1, 1) for v in (abar.sqrt(), (1 - abar).sqrt()))
    assert len(ect["t"]) == ect["batch_size"] and torch.all(ect["schedule_weights"] == 1)
    torch.testing.assert_close(c0 * ect["x_0"] + c1 * ect["noise"], ect["x_t"], rtol=1e-5, atol=1e-6)


def test_classifier_forward(ect, classifier_golden):
    with torch.no_grad():
        logits = make_classifier(ect, classifier_golden)(ect["x_t"], ect["t"])
    torch.testing.assert_close(logits, ect["logits"], atol=1e-5, rtol=1e-4)


def check_terms(terms: dict, ect: dict) -> None:
    for name in TERMS:
        torch.testing.assert_close(terms[name], ect[name], **LOSS, msg=lambda m, name=name: f"{name}: {m}")


def test_ect_terms_from_stored_logits(ect):
    assert math.log(ect["num_classes"]) == pytest.approx(ect["log_num_classes"], rel=1e-15)
    terms = ect_loss(ect["logits"], ect["y"], ect["lam"], num_classes=ect["num_classes"])
    check_terms(terms, ect)
    # the code's "entropy" is ln C - H(p) = KL(p || U) >= 0, not H
    torch.testing.assert_close(terms["entropy_term"], ect["log_num_classes"] - ect["entropy"], **LOSS)
    assert torch.all(terms["entropy_term"] > 0)


def test_ect_terms_from_recomputed_logits(ect, classifier_golden):
    with torch.no_grad():
        logits = make_classifier(ect, classifier_golden)(ect["x_t"], ect["t"])
    check_terms(ect_loss(logits, ect["y"], ect["lam"], num_classes=ect["num_classes"]), ect)


def test_grad_logits_autograd_and_closed_form(ect):
    """d L / d z = (1/B) [(p - onehot(y)) + lam p (log p + H)]."""
    logits = ect["logits"].clone().requires_grad_(True)
    ect_loss(logits, ect["y"], ect["lam"], num_classes=ect["num_classes"])["loss"].backward()
    torch.testing.assert_close(logits.grad, ect["grad_logits"], **GRAD)

    z = ect["logits"].double()
    log_p = z.log_softmax(-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1, keepdim=True)
    onehot = F.one_hot(ect["y"], z.shape[-1]).double()
    closed = ((p - onehot) + ect["lam"] * p * (log_p + entropy)) / ect["batch_size"]
    torch.testing.assert_close(closed.float(), ect["grad_logits"], **GRAD)


def backward(ect: dict, classifier_golden: dict) -> torch.nn.Module:
    net = make_classifier(ect, classifier_golden)
    logits = net(ect["x_t"], ect["t"])
    ect_loss(logits, ect["y"], ect["lam"], num_classes=ect["num_classes"])["loss"].backward()
    return net


def test_first_conv_gradients(ect, classifier_golden):
    conv = backward(ect, classifier_golden).get_submodule(FIRST_CONV)
    torch.testing.assert_close(conv.weight.grad, ect["grad_first_conv_weight"], **GRAD)
    torch.testing.assert_close(conv.bias.grad, ect["grad_first_conv_bias"], **GRAD)


def test_one_adamw_step(ect, classifier_golden):
    o = ect["optimizer"]
    assert o["name"] == "AdamW"
    net = backward(ect, classifier_golden)
    torch.optim.AdamW(net.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                      weight_decay=o["weight_decay"]).step()
    after = net.get_submodule(FIRST_CONV).weight.detach()
    torch.testing.assert_close(after, ect["first_conv_weight_after_step"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(after, ect["first_conv_weight"])
