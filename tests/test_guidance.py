"""Guidance methods against hand computations on closed-form denoisers and classifiers."""

import math

import pytest
import torch

from guidebench.guidance import ClassifierFreeGuidance, ClassifierGuidance, NoGuidance
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim, sample_ddpm
from guidebench.schedules import sigmas_respaced
from tests.analytic import MUS, GaussianDenoiser, LinearClassifier, batch, gaussian_vp


def test_cfg_matches_hand_computation_in_one_forward():
    den = GaussianDenoiser(MUS)
    x, sigma, y = batch()
    cond, uncond = den(x, sigma, y).x0, den(x, sigma, None).x0
    den.calls.clear()
    out = ClassifierFreeGuidance(scale=2.5)(den, x, sigma, y).x0
    assert den.calls == [2 * len(x)]  # both halves in one batched forward
    torch.testing.assert_close(out, uncond + 2.5 * (cond - uncond))


def test_cfg_scale_convention_and_ho_salimans_w():
    den = GaussianDenoiser(MUS)
    x, sigma, y = batch()
    cond, uncond = den(x, sigma, y).x0, den(x, sigma, None).x0
    cfg = ClassifierFreeGuidance(scale=3.0)
    w = cfg.w
    assert w == 2.0
    torch.testing.assert_close(cfg(den, x, sigma, y).x0, (1 + w) * cond - w * uncond)  # Ho & Salimans eq. 6
    torch.testing.assert_close(ClassifierFreeGuidance(scale=1.0)(den, x, sigma, y).x0, cond, rtol=0, atol=0)
    torch.testing.assert_close(ClassifierFreeGuidance(scale=0.0)(den, x, sigma, y).x0, uncond)


def test_cfg_refuses_a_model_without_null_label():
    den = GaussianDenoiser(MUS)
    den.null_label = None
    with pytest.raises(ValueError, match="null label"):
        ClassifierFreeGuidance(2.0).check(den)


def test_classifier_guidance_score_form_is_x0_plus_s_sigma2_grad():
    den = GaussianDenoiser(MUS)
    clf = LinearClassifier(torch.randn(3, 1, 4, 4), torch.randn(3))
    x, sigma, y = batch()
    out = ClassifierGuidance(clf, scale=4.0)(den, x, sigma, y).x0
    expected = den(x, sigma, y).x0 + 4.0 * sigma.float().reshape(-1, 1, 1, 1) ** 2 * clf.grad_log_prob(x, y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ClassifierGuidance(clf, scale=4.0)(den, x, sigma, y, mean_form=True).x0, den(x, sigma, y).x0)


def test_classifier_guidance_mean_form_in_vp_coordinates():
    """Dhariwal & Nichol Alg. 1: mu_vp' = mu_vp + s Sigma_vp grad_{x_t} log p, checked in VP coordinates."""
    clf = LinearClassifier(torch.randn(3, 1, 4, 4), torch.randn(3))
    x, _, y = batch()
    sigma, sigma_next = torch.full((5,), 2.0, dtype=torch.float64), torch.full((5,), 1.5, dtype=torch.float64)
    var_ve = torch.full_like(x, 0.3, dtype=torch.float64)
    shift_ve = ClassifierGuidance(clf, scale=2.0).mean_shift(None, x, sigma, sigma_next, y, var_ve)
    # by hand: x_t = x sqrt(abar); classifier sees x, so grad_{x_t} = grad_x / sqrt(abar)
    abar, abar_next = 1 / (1 + 2.0**2), 1 / (1 + 1.5**2)
    grad_vp = clf.grad_log_prob(x, y).double() / math.sqrt(abar)
    var_vp = var_ve * abar_next
    torch.testing.assert_close(shift_ve * math.sqrt(abar_next), 2.0 * var_vp * grad_vp, rtol=1e-5, atol=1e-6)


def test_guidance_moves_samples_toward_the_class():
    """A strong classifier makes an unconditional Gaussian mixture sampler pick the class."""
    den = gaussian_vp(torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 1.0)]), s=0.3)
    clf = LinearClassifier(torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 1.0)]), torch.zeros(2))
    sigmas = sigmas_respaced(den, "50")
    n = 64
    y = torch.arange(n) % 2
    null = torch.full_like(y, 2)

    class Uncond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k in ("img_channels", "img_resolution", "num_classes", "sigma_min", "sigma_max"):
                setattr(self, k, getattr(den, k))
            self.null_label, self.variance_preserving = None, True

        def round_sigma(self, s):
            return den.round_sigma(s)

        def forward(self, x, sigma, labels):
            return den(x, sigma, null)

    x = StackedRandomGenerator("cpu", range(n)).randn([n, 1, 4, 4], dtype=torch.float64) * math.sqrt(
        1 + float(sigmas[0]) ** 2)
    acc = {}
    for solver in (sample_ddpm, sample_ddim):
        for s in (0.0, 20.0):
            out = solver(Uncond(), x, sigmas, y, guidance=ClassifierGuidance(clf, s),
                         rng=StackedRandomGenerator("cpu", range(n)))
            acc[solver.__name__, s] = ((out.mean(dim=(1, 2, 3)) > 0).long() == y).float().mean().item()
    assert acc["sample_ddpm", 20.0] > 0.95 and acc["sample_ddim", 20.0] > 0.95
    assert acc["sample_ddpm", 0.0] < 0.8 and acc["sample_ddim", 0.0] < 0.8


def test_no_guidance_is_the_denoiser():
    den = GaussianDenoiser(MUS)
    x, sigma, y = batch()
    assert torch.equal(NoGuidance()(den, x, sigma, y).x0, den(x, sigma, y).x0)
