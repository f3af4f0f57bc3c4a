"""ADM against numbers made by openai/guided-diffusion itself (adm_unet.pt, adm_classifier.pt, adm_guided_step.pt).

Everything is rebuilt from the stored flags and state dicts through guidebench's own loaders, and the
guided step is recomputed with guidebench's sigma-space maths (denoiser, `ddpm_step_moments`,
`ClassifierGuidance`, `sample_ddim`), then mapped to ADM's VP coordinates: x_vp = x / sqrt(1 + sigma^2),
a mean or sample at the next level sigma' divided by sqrt(1 + sigma'^2), a variance by (1 + sigma'^2).
Tolerances: golden README (forward atol 1e-5 / rtol 1e-4; x0 at the noisiest step 5e-4; DDIM 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from guidebench.backbones.adm import create_classifier, create_unet, load_denoiser
from guidebench.checkpoints import load_state_dict_checked
from guidebench.classifiers.adm import load_classifier
from guidebench.guidance import ClassifierGuidance
from guidebench.guidance.classifier import classifier_log_prob_grad
from guidebench.samplers import ddpm_step_moments, sample_ddim
from guidebench.schedules import sigmas_respaced, space_timesteps
from tests.golden import load_golden

pytestmark = pytest.mark.golden

FORWARD = dict(atol=1e-5, rtol=1e-4)


def close_to(actual: torch.Tensor, expected: torch.Tensor, rel_atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """assert_close with atol relative to the reference's scale (for small-valued tensors)."""
    atol = rel_atol * float(expected.abs().max())
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def unet_golden() -> dict:
    return load_golden("adm_unet.pt")


@pytest.fixture(scope="module")
def classifier_golden() -> dict:
    return load_golden("adm_classifier.pt")


@pytest.fixture(scope="module")
def step_golden() -> dict:
    return load_golden("adm_guided_step.pt")


@pytest.fixture(scope="module")
def denoiser(unet_golden, tmp_path_factory):
    path = tmp_path_factory.mktemp("adm") / "unet.pt"
    torch.save(unet_golden["state_dict"], path)
    return load_denoiser(path, **unet_golden["flags"])


@pytest.fixture(scope="module")
def classifier(classifier_golden, tmp_path_factory):
    path = tmp_path_factory.mktemp("adm") / "classifier.pt"
    torch.save(classifier_golden["state_dict"], path)
    return load_classifier(path, **classifier_golden["flags"])


@torch.no_grad()
def test_unet_forward(unet_golden):
    g = unet_golden
    net = create_unet(g["flags"])
    load_state_dict_checked(net, g["state_dict"], path="adm_unet.pt", source="golden")
    assert list(net.state_dict()) == list(g["state_dict"])
    torch.testing.assert_close(net(g["x"], g["t"], g["y"]), g["out"], **FORWARD)


@torch.no_grad()
def test_load_denoiser_reads_eps_and_variance(unet_golden, denoiser):
    """D(x; sigma_t) = clip(x - sigma_t eps) and var_frac = (v + 1) / 2 from the same forward."""
    g = unet_golden
    sigma = denoiser.sigmas[g["t"]]
    scale = (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    out = denoiser((g["x"] * scale).float(), sigma, g["y"])
    assert out.x0.dtype == torch.float32 and denoiser.null_label is None and denoiser.num_classes == 1000
    pred, v = g["out"].double()[:, :3], g["out"].double()[:, 3:]
    x0 = pred if g["flags"]["predict_xstart"] else g["x"].double() * scale - sigma.reshape(-1, 1, 1, 1) * pred
    torch.testing.assert_close(out.x0.double(), x0.clamp(-1, 1), atol=5e-4, rtol=1e-4)
    if g["flags"]["learn_sigma"]:
        torch.testing.assert_close(out.var_frac.double(), (v + 1) / 2, **FORWARD)
    else:
        assert out.var_frac is None


@torch.no_grad()
def test_load_denoiser_bfloat16(unet_golden, tmp_path):
    """dtype switch: the torso computes in bfloat16, norms and the output stay float32."""
    g = unet_golden
    torch.save(g["state_dict"], tmp_path / "unet.pt")
    den = load_denoiser(tmp_path / "unet.pt", **g["flags"], dtype="bfloat16")
    net = den.net
    assert net.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert net.out[2].weight.dtype == torch.float32 and net.time_embed[0].weight.dtype == torch.float32
    out = net(g["x"], g["t"], g["y"])
    assert out.dtype == torch.float32
    err = (out - g["out"]).abs().max()
    assert 0 < err < 0.05 * g["out"].abs().max()


@torch.no_grad()
def test_classifier_forward(classifier_golden, classifier):
    g = classifier_golden
    net = create_classifier(g["flags"])
    load_state_dict_checked(net, g["state_dict"], path="adm_classifier.pt", source="golden")
    assert list(net.state_dict()) == list(g["state_dict"])
    torch.testing.assert_close(net(g["x"], g["t"]), g["logits"], **FORWARD)
    # the sigma-space adapter: x = x_t sqrt(1 + sigma_t^2) at sigma_t of the classifier's schedule
    sigma = classifier.sigmas[g["t"]]
    x = g["x"] * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1).float()
    torch.testing.assert_close(classifier(x, sigma), g["logits"], **FORWARD)


def test_space_timesteps_reproduces_adm(step_golden, unet_golden):
    for part in (step_golden, step_golden["ddim"]):
        kept = space_timesteps(unet_golden["flags"]["diffusion_steps"], part["respacing"])
        assert kept == part["schedule"]["use_timesteps"] == part["schedule"]["timestep_map"]


def test_respaced_sigmas_match_adm_schedule(step_golden, denoiser):
    for part in (step_golden, step_golden["ddim"]):
        sigmas = sigmas_respaced(denoiser, part["respacing"])
        abar = 1 / (1 + sigmas[:-1].flip(0) ** 2)
        torch.testing.assert_close(abar, part["schedule"]["alphas_cumprod"], atol=1e-12, rtol=1e-10)


def _step_inputs(step_golden, denoiser, step):
    sigmas = sigmas_respaced(denoiser, step_golden["respacing"])
    i = len(sigmas) - 2 - step["index"]  # descending position of respaced index
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x = step["x_t"].double() * (1 + sigma**2).sqrt()
    return sigmas, i, sigma.expand(1), sigma_next.expand(1), x


def test_guided_steps(step_golden, unet_golden, denoiser, classifier):
    # create_gaussian_diffusion: LEARNED_RANGE with learn_sigma, else FIXED_LARGE (sigma_small=False)
    assert step_golden["clip_denoised"]  # the denoiser clips x0 (clip_x0=True, the default)
    variance = "learned" if unet_golden["flags"]["learn_sigma"] else "fixed_large"
    for step in step_golden["steps"]:
        _check_guided_step(step_golden, denoiser, classifier, step, variance)


def _check_guided_step(g, denoiser, classifier, step, variance):
    """model output, p_mean_variance, cond_fn, condition_mean and condition_score at one respaced step."""
    y, scale = g["y"], g["classifier_scale"]
    sigmas, i, sigma, sigma_next, x = _step_inputs(g, denoiser, step)
    to_vp = (1 + sigma_next**2).sqrt()  # mean at the next level: VP = sigma space / sqrt(1 + sigma'^2)
    assert int(denoiser.sigma_to_t(sigma)) == int(step["t_mapped"])
    assert int(classifier.sigma_to_t(sigma)) == int(step["t_mapped"])
    noisiest = dict(atol=5e-4, rtol=1e-4)

    with torch.no_grad():
        torch.testing.assert_close(denoiser.net(step["x_t"], step["t_mapped"], y), step["model_out"], **FORWARD)
        den = denoiser(x.float(), sigma, y)
    torch.testing.assert_close(den.x0, step["pred_xstart"], **noisiest)
    mean, var = ddpm_step_moments(x, den, sigmas, i, variance)
    torch.testing.assert_close((mean / to_vp).float(), step["mean"], **FORWARD)
    close_to(var / to_vp**2, step["variance"])
    torch.testing.assert_close((var / to_vp**2).log().float(), step["log_variance"], **FORWARD)

    grad_vp = classifier_log_prob_grad(classifier, x.float(), sigma, y) * (1 + sigma**2).sqrt() * scale
    close_to(grad_vp, step["cond_grad"])

    guidance = ClassifierGuidance(classifier, scale)
    shift = guidance.mean_shift(denoiser, x.float(), sigma, sigma_next, y, var)
    torch.testing.assert_close(((mean + shift) / to_vp).float(), step["guided_mean"], **FORWARD)

    with torch.no_grad():
        guided = guidance(denoiser, x.float(), sigma, y)
    torch.testing.assert_close(guided.x0, step["cond_score_pred_xstart"], **noisiest)
    guided_mean, _ = ddpm_step_moments(x, guided, sigmas, i, variance)
    torch.testing.assert_close((guided_mean / to_vp).float(), step["cond_score_mean"], **FORWARD)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@torch.no_grad()
def test_ddim_loop(step_golden, denoiser, classifier, guided):
    """ddim_sample_loop(eta=0, clip_denoised=True) from x_T, with cond_fn through condition_score."""
    g = step_golden["ddim"]
    assert g["eta"] == 0.0 and g["clip_denoised"]
    sigmas = sigmas_respaced(denoiser, g["respacing"])
    x = g["x_T"].double() * (1 + sigmas[0] ** 2).sqrt()
    guidance = ClassifierGuidance(classifier, step_golden["classifier_scale"]) if guided else None
    sample = sample_ddim(denoiser, x, sigmas, g["y"], guidance=guidance, eta=0.0)
    expected = g["sample_guided" if guided else "sample_unguided"]
    torch.testing.assert_close(sample.float(), expected, atol=1e-4, rtol=1e-4)
