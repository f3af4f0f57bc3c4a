"""The CFG family against diffusers' guiders on the same tensors, and the interval / schedule / rescale keys."""

import math

import pytest
import torch

from guidebench.guidance import (AdaptiveProjectedGuidance, AutoGuidance, CFGZeroStar, ClassifierFreeGuidance,
                                 TangentialCFG)
from guidebench.guidance.cfg import rescale_guided
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim, sample_heun
from guidebench.schedules import sigmas_karras
from tests.analytic import MUS, GaussianDenoiser, batch

guiders = pytest.importorskip("diffusers.guiders")


def predictions(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, 4, 4, generator=g)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 7.0])
def test_cfg_matches_diffusers_in_both_conventions(scale):
    cond, uncond = predictions()
    ours = ClassifierFreeGuidance(scale).combine(cond, uncond, scale)
    native = guiders.ClassifierFreeGuidance(guidance_scale=scale).forward(cond, uncond).pred  # 1 = unguided
    original = guiders.ClassifierFreeGuidance(guidance_scale=scale - 1, use_original_formulation=True)
    torch.testing.assert_close(ours, native)
    torch.testing.assert_close(ours, original.forward(cond, uncond).pred)  # 0 = unguided: w = scale - 1


def test_rescale_matches_diffusers_and_keeps_the_conditional_std():
    den = GaussianDenoiser(MUS)
    x, sigma, y = batch()
    cond, uncond = den(x, sigma, y).x0, den(x, sigma, None).x0
    ours = ClassifierFreeGuidance(4.0, rescale=0.7)(den, x, sigma, y).x0
    theirs = guiders.ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.7).forward(cond, uncond).pred
    torch.testing.assert_close(ours, theirs)
    full = rescale_guided(uncond + 4 * (cond - uncond), cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))


def test_interval_steps_is_diffusers_start_stop_window():
    n = 10
    ours = ClassifierFreeGuidance(3.0, interval_steps=[0.2, 0.65])
    ours.begin(None, torch.linspace(5, 0, n + 1, dtype=torch.float64), None)
    theirs = guiders.ClassifierFreeGuidance(guidance_scale=3.0, start=0.2, stop=0.65)
    for i in range(n):
        theirs.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(0))
        assert (ours.step_scale(i) != 1) == theirs._is_cfg_enabled(), i


def test_interval_guides_sigma_in_lo_hi_and_skips_the_uncond_forward():
    """Both Heun stages of a step take the step's branch; outside (lo, hi] only the conditional forward runs."""
    den = GaussianDenoiser(MUS)
    sigmas = sigmas_karras(den, 6)
    lo, hi = float(sigmas[4]), float(sigmas[1])  # guided: sigmas[1..3] (lo itself excluded, hi included)
    x, _, y = batch(2)
    x = x.double() * 80
    for method in (ClassifierFreeGuidance(2.0, interval=[lo, hi]), AdaptiveProjectedGuidance(2.0, interval=[lo, hi]),
                   AutoGuidance(GaussianDenoiser(MUS * 0.5), 2.0, interval=[lo, hi])):
        den.calls.clear()
        sample_heun(den, x, sigmas, y, guidance=method)
        batches = [2, 2] + [4, 4] * 3 + [2, 2] + [2]  # steps 0 and 4 unguided, step 5 (to 0) Euler only
        if isinstance(method, AutoGuidance):
            batches = [2, 2] + [2, 2] * 3 + [2, 2] + [2]  # its guide runs as a second network
        assert den.calls == batches, type(method).__name__
    with pytest.raises(ValueError, match="sigma_lo < sigma_hi"):
        ClassifierFreeGuidance(2.0, interval=[2.0, 1.0])
    with pytest.raises(ValueError, match="interval_steps"):
        ClassifierFreeGuidance(2.0, interval_steps=[0.5, 1.5])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "clamp_linear"])
def test_schedules_follow_wang_et_al(schedule):
    n, scale = 8, 3.0
    g = ClassifierFreeGuidance(scale, schedule=schedule, schedule_clamp=1.0)
    g.begin(None, torch.linspace(5, 0, n + 1, dtype=torch.float64), None)
    for i in range(n):
        p = (i + 1) / n
        w = {"constant": 2.0, "linear": 2 * p * 2.0, "cosine": (1 - math.cos(math.pi * p)) * 2.0,
             "clamp_linear": max(1.0, 2 * p * 2.0)}[schedule]
        assert g.step_scale(i) == pytest.approx(1 + w)
    with pytest.raises(ValueError, match="schedule"):
        ClassifierFreeGuidance(2.0, schedule="exp")


def test_apg_matches_diffusers_original_formulation_over_a_trajectory():
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    scale, eta, beta, r = 4.0, 0.3, -0.5, 2.0
    ours = AdaptiveProjectedGuidance(scale, eta=eta, momentum=beta, norm_threshold=r)
    ours.begin(None, torch.linspace(5, 0, 4, dtype=torch.float64), None)
    theirs = guiders.AdaptiveProjectedGuidance(guidance_scale=scale - 1, eta=eta, use_original_formulation=True,
                                               adaptive_projected_guidance_momentum=beta,
                                               adaptive_projected_guidance_rescale=r)
    theirs.momentum_buffer = MomentumBuffer(beta)
    for seed in range(3):  # three steps: the momentum carries over
        cond, uncond = predictions(seed)
        torch.testing.assert_close(ours.combine(cond, uncond, scale), theirs.forward(cond, uncond).pred,
                                   rtol=1e-5, atol=1e-6)
    ours.begin(None, torch.linspace(5, 0, 4, dtype=torch.float64), None)
    assert ours.running is None  # reset per trajectory


def test_apg_without_projection_momentum_or_threshold_is_cfg():
    cond, uncond = predictions()
    torch.testing.assert_close(AdaptiveProjectedGuidance(3.0, eta=1.0, momentum=0.0).combine(cond, uncond, 3.0),
                               ClassifierFreeGuidance(3.0).combine(cond, uncond, 3.0), rtol=1e-5, atol=1e-6)


def test_cfg_zero_star_matches_diffusers_with_zeroed_first_steps():
    den = GaussianDenoiser(MUS)
    x, sigma, y = batch()
    ours = CFGZeroStar(3.0, zero_init_steps=1)
    ours.begin(den, torch.linspace(5, 0, 5, dtype=torch.float64), y)
    theirs = guiders.ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1)
    cond, uncond = den(x, sigma, y).x0, den(x, sigma, None).x0
    for step in range(3):
        theirs.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(0))
        torch.testing.assert_close(ours(den, x, sigma, y, step=step).x0, theirs.forward(cond, uncond).pred)
    assert torch.equal(ours(den, x, sigma, y, step=0).x0, torch.zeros_like(cond))


def test_tcfg_matches_diffusers():
    cond, uncond = predictions()
    ours = TangentialCFG(2.5).combine(cond, uncond, 2.5)
    theirs = guiders.TangentialClassifierFreeGuidance(guidance_scale=2.5).forward(cond, uncond).pred
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_autoguidance_interpolates_between_the_guide_and_the_model():
    den, guide = GaussianDenoiser(MUS), GaussianDenoiser(MUS * 0.5, s=0.8)
    x, sigma, y = batch()
    out = AutoGuidance(guide, 2.5)(den, x, sigma, y).x0
    d1, d0 = den(x, sigma, y).x0, guide(x, sigma, y).x0
    torch.testing.assert_close(out, d0 + 2.5 * (d1 - d0))
    assert torch.equal(AutoGuidance(den, 2.5)(den, x, sigma, y).x0, d1)  # a guide equal to the model: no change
    den.null_label = None
    AutoGuidance(guide, 2.0).check(den)  # needs no null label
    with pytest.raises(ValueError, match="num_classes"):
        AutoGuidance(GaussianDenoiser(MUS[:2]), 2.0).check(den)
    with pytest.raises(ValueError, match="needs a guide"):
        AutoGuidance(None, 2.0).check(den)


def test_cfg_like_methods_refuse_a_backbone_without_null_label():
    den = GaussianDenoiser(MUS)
    den.null_label = None
    for method in (ClassifierFreeGuidance(2.0), AdaptiveProjectedGuidance(2.0), CFGZeroStar(2.0), TangentialCFG(2.0)):
        with pytest.raises(ValueError, match="null label"):
            method.check(den)


def test_every_cfg_like_method_sharpens_the_class_posterior():
    """On the Gaussian mixture each method at scale 3 raises the mixture's log p(y | x) of its samples (CFG samples
    towards p(x | y) p(y | x)^w), relative to the unguided conditional sampler."""
    den = GaussianDenoiser(MUS, s=0.8)
    sigmas = sigmas_karras(den, 12)
    x = torch.randn(60, 1, 4, 4, generator=torch.Generator().manual_seed(3)).double() * 80
    y = torch.arange(60) % 3

    def distance(guidance):  # minus the mean log posterior of the requested class
        out = sample_ddim(den, x, sigmas, y, guidance=guidance, rng=StackedRandomGenerator("cpu", range(60)))
        logits = -(out.float().flatten(1)[:, None] - MUS.flatten(1)[None]).square().sum(-1) / (2 * 0.8**2)
        return -torch.log_softmax(logits, -1)[torch.arange(60), y].mean()

    base = distance(ClassifierFreeGuidance(1.0))
    for method in (ClassifierFreeGuidance(3.0), AdaptiveProjectedGuidance(3.0, eta=1.0), CFGZeroStar(3.0, 0),
                   TangentialCFG(3.0), AutoGuidance(GaussianDenoiser(MUS, s=1.5), 3.0)):
        assert distance(method) < base, type(method).__name__


def test_cfgpp_step_is_guided_x0_renoised_with_the_unconditional_eps():
    """One DDIM step (eta 0) with CFG++: x' = x0_u + lam (x0_c - x0_u) + sigma' (x - x0_u) / sigma (Chung et al. 2025)."""
    from guidebench.guidance import CFGPlusPlus
    from guidebench.samplers import sample_ddpm

    den = GaussianDenoiser(MUS)
    x, _, y = batch()
    sigmas = torch.tensor([3.0, 1.2, 0.0], dtype=torch.float64)
    g = CFGPlusPlus(0.6)
    g.check(den, sample_ddim)
    first = {}

    def record(info):
        first.setdefault("x", info["x"])

    sample_ddim(den, x.double(), sigmas, y, guidance=g, callback=record)
    s = sigmas[0].expand(5)
    c, u = den(x, s, y).x0.double(), den(x, s, None).x0.double()
    expected = u + 0.6 * (c - u) + 1.2 * (x.double() - u) / 3.0
    torch.testing.assert_close(first["x"], expected, rtol=1e-6, atol=1e-6)
    lam0 = sample_ddim(den, x.double(), sigmas, y, guidance=CFGPlusPlus(0.0))
    uncond = sample_ddim(den, x.double(), sigmas, torch.full_like(y, den.null_label))
    torch.testing.assert_close(lam0, uncond)  # lam = 0: unconditional sampling
    for solver in (sample_ddpm, sample_heun):
        with pytest.raises(ValueError, match="sampler=ddim"):
            g.check(den, solver)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CFGPlusPlus(1.5)


def test_cfgpp_composes_with_the_interval():
    from guidebench.guidance import CFGPlusPlus

    den = GaussianDenoiser(MUS)
    sigmas = sigmas_karras(den, 6)
    x, _, y = batch(2)
    sample_ddim(den, x.double() * 80, sigmas, y, guidance=CFGPlusPlus(0.5, interval=[float(sigmas[4]), float(sigmas[1])]))
    assert den.calls[-6:] == [2, 4, 4, 4, 2, 2]
