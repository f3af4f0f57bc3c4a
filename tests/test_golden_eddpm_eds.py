"""EDS (ED-DPM's entropy-driven sampling) against numbers made by ZGCTroy/ED-DPM itself (eddpm_eds.pt).

Models: adm_unet.pt and adm_classifier.pt of the same set, through guidebench's loaders. Each stored step is
recomputed in sigma space and mapped to ADM's VP coordinates as in test_golden_adm.py. Tolerances:
README-eddpm.md (entropy/scales rtol 1e-5; gradients atol 1e-6 + rtol 1e-4; means 1e-5; x0 at t = 999 5e-4;
DDIM samples 1e-4).
"""

from __future__ import annotations

import math

import pytest
import torch

from guidebench.backbones.adm import load_denoiser
from guidebench.classifiers.adm import load_classifier
from guidebench.guidance import ClassifierGuidance, EntropyDrivenGuidance
from guidebench.guidance.classifier import classifier_log_prob_and_grad
from guidebench.samplers import ddpm_step_moments, sample_ddim
from guidebench.schedules import sigmas_respaced, space_timesteps
from tests.golden import load_golden

pytestmark = pytest.mark.golden

SCALES = dict(rtol=1e-5, atol=1e-6)
GRAD = dict(rtol=1e-4, atol=1e-6)
MEAN = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def eds() -> dict:
    return load_golden("eddpm_eds.pt")


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory):
    g = load_golden("adm_unet.pt")
    path = tmp_path_factory.mktemp("eds") / "unet.pt"
    torch.save(g["state_dict"], path)
    return load_denoiser(path, **g["flags"]), g["flags"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    g = load_golden("adm_classifier.pt")
    path = tmp_path_factory.mktemp("eds") / "classifier.pt"
    torch.save(g["state_dict"], path)
    return load_classifier(path, **g["flags"])


def test_schedules_are_adm_respacings(eds, denoiser):
    den, flags = denoiser
    for part in (eds, eds["ddim"]):
        assert space_timesteps(flags["diffusion_steps"], part["respacing"]) == part["schedule"]["timestep_map"]
        abar = 1 / (1 + sigmas_respaced(den, part["respacing"])[:-1].flip(0) ** 2)
        torch.testing.assert_close(abar, part["schedule"]["alphas_cumprod"], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("k", range(3))
def test_eds_step(eds, denoiser, classifier, k):
    """entropy, ln C / H, the per-sample scale, grad log p, condition_mean and condition_score at one step."""
    den, flags = denoiser
    g, step = eds, eds["steps"][k]
    assert g["use_entropy_scale"] and g["clip_denoised"]
    sigmas = sigmas_respaced(den, g["respacing"])
    i = len(sigmas) - 2 - step["index"]
    sigma, sigma_next = sigmas[i].expand(1), sigmas[i + 1].expand(1)
    to_vp_in, to_vp = (1 + sigma**2).sqrt(), (1 + sigma_next**2).sqrt()
    x = (step["x_t"].double() * to_vp_in).float()
    y = g["y"]
    assert (classifier.sigma_to_t(sigma) == step["t_mapped"]).all()

    eds_guidance = EntropyDrivenGuidance(classifier, g["classifier_scale"], entropy_classes=g["num_classes"])
    grad, logits = classifier_log_prob_and_grad(classifier, x, sigma, y)
    torch.testing.assert_close(logits, step["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.softmax(logits, -1), step["probabilities"], **SCALES)
    factor = eds_guidance.entropy_factor(logits)
    torch.testing.assert_close(math.log(g["num_classes"]) / factor, step["entropy"], **SCALES)
    torch.testing.assert_close(factor, step["entropy_scale"], **SCALES)
    torch.testing.assert_close(eds_guidance.sample_scale(logits), step["eds_scale"], **SCALES)
    assert (factor >= 1).all()  # H <= ln C: EDS only amplifies
    torch.testing.assert_close(grad * to_vp_in.float(), step["grad_log_prob"], **GRAD)

    with torch.no_grad():
        d = den(x, sigma, y)
    variance = "learned" if flags["learn_sigma"] else "fixed_large"
    mean, var = ddpm_step_moments(x.double(), d, sigmas, i, variance)
    torch.testing.assert_close((mean / to_vp).float(), step["mean"], **MEAN)
    shift = eds_guidance.mean_shift(den, x, sigma, sigma_next, y, var, den=d, step=i)
    torch.testing.assert_close(((mean + shift) / to_vp).float(), step["guided_mean"], **MEAN)

    with torch.no_grad():
        guided = eds_guidance(den, x, sigma, y, step=i)
    noisiest = dict(atol=5e-4, rtol=1e-4) if int(step["t_mapped"][0]) == flags["diffusion_steps"] - 1 else MEAN
    torch.testing.assert_close(guided.x0, step["cond_score_pred_xstart"], **noisiest)
    guided_mean, _ = ddpm_step_moments(x.double(), guided, sigmas, i, variance)
    torch.testing.assert_close((guided_mean / to_vp).float(), step["cond_score_mean"], **MEAN)


def test_entropy_classes_default_is_the_classifiers(eds, classifier):
    """ln C from the classifier's class count equals the original's ln 1000 for a 1000-way classifier."""
    logits = eds["steps"][0]["logits"]
    assert logits.shape[-1] == eds["num_classes"]
    torch.testing.assert_close(EntropyDrivenGuidance(classifier, 1.0).entropy_factor(logits),
                               EntropyDrivenGuidance(classifier, 1.0, entropy_classes=1000).entropy_factor(logits))
    assert math.isclose(eds["log_num_classes"], math.log(eds["num_classes"]))


@pytest.mark.parametrize("entropy", [True, False], ids=["eds", "plain"])
@torch.no_grad()
def test_ddim_loop(eds, denoiser, classifier, entropy):
    """classifier_sample.py's DDIM run (eta 0, clip_denoised) from the stored x_T and labels."""
    den, _ = denoiser
    g = eds["ddim"]
    assert g["eta"] == 0.0 and g["clip_denoised"]
    sigmas = sigmas_respaced(den, g["respacing"])
    x = g["x_T"].double() * (1 + sigmas[0] ** 2).sqrt()
    scale = eds["classifier_scale"]
    guidance = (EntropyDrivenGuidance(classifier, scale, entropy_classes=eds["num_classes"]) if entropy
                else ClassifierGuidance(classifier, scale))
    sample = sample_ddim(den, x, sigmas, g["y"], guidance=guidance, eta=0.0)
    torch.testing.assert_close(sample.float(), g["sample_eds" if entropy else "sample_plain"], atol=1e-4, rtol=1e-4)
    if entropy:  # EDS moves the samples well outside the tolerance
        assert (g["sample_eds"] - g["sample_plain"]).abs().max() > 1e-2
