"""EluCD's two branches against numbers made by AlexMaOLS/EluCD itself (elucd_ddpm.pt, elucd_edm.pt).

Networks: adm_unet.pt / edm_snapshot.pkl of the same set and the stand-in ResNet of elucd_classifier.pt,
through guidebench's loaders; the ReLU -> Softplus swap is done by the guidance from its softplus_beta.
DDPM: every step teacher-forced from the stored trajectory and noise (the robust test, README-elucd.md
section 6), plus the free-running loops. EDM: per-step weights, objective and displacement, and the whole
Heun run with the stored per-step noise. Tolerances: README-elucd.md section 6.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from guidebench.backbones.adm import load_denoiser as load_adm
from guidebench.backbones.edm import load_denoiser as load_edm
from guidebench.classifiers.torchvision_resnet import TorchvisionClassifier
from guidebench.guidance import EluCDEDMGuidance, EluCDGuidance, NoGuidance
from guidebench.guidance.elucd import calibrated_objective_grad
from guidebench.samplers import ddpm_step_moments, sample_ddpm, sample_heun
from guidebench.schedules import sigmas_karras, sigmas_respaced, space_timesteps
from tests.golden import elucd_fixture_resnet, golden_path, load_golden

pytestmark = pytest.mark.golden

TIGHT = dict(atol=1e-5, rtol=1e-4)


class Replay:
    """An rng whose randn_like returns the stored draws in order (in place of StackedRandomGenerator)."""

    def __init__(self, draws):
        self.draws = list(draws)

    def randn_like(self, x):
        return self.draws.pop(0).to(x)


@pytest.fixture(scope="module")
def resnet():
    g = load_golden("elucd_classifier.pt")
    net = elucd_fixture_resnet(g)
    net.load_state_dict(g["state_dict"])
    return TorchvisionClassifier(net)


@pytest.fixture(scope="module")
def ddpm() -> dict:
    return load_golden("elucd_ddpm.pt")


@pytest.fixture(scope="module")
def edm() -> dict:
    return load_golden("elucd_edm.pt")


@pytest.fixture(scope="module")
def unet(ddpm, tmp_path_factory):
    g = load_golden("adm_unet.pt")
    path = tmp_path_factory.mktemp("elucd") / "unet.pt"
    torch.save(g["state_dict"], path)
    flags = {**ddpm["model_flags"], "timestep_respacing": ""}  # respacing is the sampler's (ddpm["respacing"])
    assert flags == {**g["flags"], "timestep_respacing": ""}
    return load_adm(path, **flags)


def _ddpm_guidance(resnet, h: dict) -> EluCDGuidance:
    return EluCDGuidance(copy.deepcopy(resnet), h["classifier_scale"], h["softplus_beta"], h["joint_temperature"],
                         h["margin_temperature_discount"], h["gamma_factor"], max_variance="first_in_batch")


def test_ddpm_schedule(ddpm, unet):
    flags = ddpm["model_flags"]
    assert space_timesteps(flags["diffusion_steps"], ddpm["respacing"]) == ddpm["schedule"]["timestep_map"]
    abar = 1 / (1 + sigmas_respaced(unet, ddpm["respacing"])[:-1].flip(0) ** 2)
    torch.testing.assert_close(abar, ddpm["schedule"]["alphas_cumprod"], atol=1e-12, rtol=1e-10)


def test_ddpm_temperatures(ddpm, resnet):
    for h in (ddpm["hparams"], ddpm["hparams_script"]):
        guidance = _ddpm_guidance(resnet, h)
        assert (guidance.tau1, guidance.tau2) == pytest.approx((h["tau1"], h["tau2"]))


def test_ddpm_teacher_forced_steps(ddpm, unet, resnet):
    """Each p_sample of the guided loop from the stored x_t and noise: mean, variance, x0, objective, a_t, sample."""
    g = ddpm
    assert g["clip_denoised"] and g["model_flags"]["learn_sigma"]
    sigmas = sigmas_respaced(unet, g["respacing"])
    k_steps = len(sigmas) - 1
    guidance = _ddpm_guidance(resnet, g["hparams"])
    guidance.begin(unet, sigmas, g["y"])
    detail = {s["loop_position"]: s for s in g["steps"]}
    for k in range(k_steps):
        sigma, sigma_next = sigmas[k].expand(1), sigmas[k + 1].expand(1)
        to_vp_in, to_vp = (1 + sigma**2).sqrt(), (1 + sigma_next**2).sqrt()
        x = g["trajectory"][k].double() * to_vp_in
        with torch.no_grad():
            den = unet(x.float(), sigma, g["y"])
        mean, var = ddpm_step_moments(x, den, sigmas, k, "learned")
        shift = guidance.mean_shift(unet, x.float(), sigma, sigma_next, g["y"], var, den=den, step=k)
        expected = g["per_step"][k]
        assert expected["index"] == k_steps - 1 - k
        assert float(guidance.running_max[0]) == pytest.approx(expected["max_variance"], rel=1e-6)
        _, objective = calibrated_objective_grad(guidance.classifier, den.x0, sigma, g["y"], guidance.tau1, guidance.tau2)
        torch.testing.assert_close(objective, expected["objective"], atol=1e-5, rtol=1e-5)
        noise = g["noise"][k].double() if k < k_steps - 1 else 0
        sample = (mean + shift + var.sqrt() * noise) / to_vp if k < k_steps - 1 else (mean + shift).float()
        target = g["trajectory"][k + 1] if k < k_steps - 1 else g["sample_guided"]
        torch.testing.assert_close(sample.float(), target, **TIGHT)
        if k in detail:
            d = detail[k]
            first = dict(atol=1e-4, rtol=1e-4) if k == 0 else TIGHT  # x0 at t = 999 is amplified x157
            torch.testing.assert_close(den.x0, d["classifier_input"], **first)
            torch.testing.assert_close((mean / to_vp).float(), d["mean"], **TIGHT)
            torch.testing.assert_close((var / to_vp**2).float(), d["variance"], **TIGHT)
            torch.testing.assert_close(guidance.classifier(d["classifier_input"]), d["logits"], atol=2e-5, rtol=1e-4)
            grad, _ = calibrated_objective_grad(guidance.classifier, d["classifier_input"], sigma, g["y"],
                                                guidance.tau1, guidance.tau2)
            torch.testing.assert_close(guidance.scale * grad, d["cond_grad"], **TIGHT)
            torch.testing.assert_close(((mean + shift) / to_vp).float(), d["guided_mean"], **TIGHT)
    # a_t from the recorded Sigma[0,0,0,0] alone: the running max and the sine schedule, to the last bits
    guidance.begin(unet, sigmas, g["y"])
    for k, s in enumerate(g["per_step"]):
        a = guidance.add_value(torch.full((2, 3, 1, 1), s["variance_00"], dtype=torch.float64), k)
        assert float(a[0]) == pytest.approx(s["add_value"], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("run", ["hparams", "hparams_script", "unguided"])
@torch.no_grad()
def test_ddpm_loop(ddpm, unet, resnet, run):
    """p_sample_loop from x_T with the stored noise; the guided loops within README's 1e-3 screening margin."""
    g = ddpm
    sigmas = sigmas_respaced(unet, g["respacing"])
    guidance = NoGuidance() if run == "unguided" else _ddpm_guidance(resnet, g[run])
    x = g["x_T"].double() * (1 + sigmas[0] ** 2).sqrt()
    sample = sample_ddpm(unet, x, sigmas, g["y"], guidance=guidance, rng=Replay(g["noise"].double()),
                         variance="learned")
    expected = {"hparams": g["sample_guided"], "hparams_script": g["script_run"]["sample_guided"],
                "unguided": g["sample_unguided"]}[run]
    torch.testing.assert_close(sample.float(), expected, atol=1e-4 if run == "unguided" else 1e-3, rtol=0)
    if run != "unguided":
        assert (expected - g["sample_unguided"]).abs().max() > 1e-2  # guidance matters beyond the tolerance


def test_ddpm_per_sample_running_max_is_batch_independent(ddpm, unet, resnet):
    """The default takes each sample's own Sigma[0,0,0] into its running max; the original, sample 0's for all."""
    sigmas = sigmas_respaced(unet, ddpm["respacing"])
    variances = [torch.tensor([0.5, 0.9, 0.2]), torch.tensor([0.7, 0.3, 0.4])]
    add = {}
    for mode in ("per_sample", "first_in_batch"):
        guidance = _ddpm_guidance(resnet, ddpm["hparams"])
        guidance.max_variance = mode
        guidance.begin(unet, sigmas, None)
        for k, v in enumerate(variances):
            add[mode] = guidance.add_value(v.double().reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2), k)
        alone = _ddpm_guidance(resnet, ddpm["hparams"])
        alone.max_variance = mode
        alone.begin(unet, sigmas, None)
        for k, v in enumerate(variances):
            single = alone.add_value(v[1:2].double().reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2), k)
        if mode == "per_sample":
            assert torch.equal(single[0], add[mode][1])  # sample 1's value does not depend on its batch
    sine = math.sin(math.pi * (len(sigmas) - 3) / (len(sigmas) - 1)) * ddpm["hparams"]["gamma_factor"]
    torch.testing.assert_close(add["per_sample"], sine * torch.tensor([0.7, 0.9, 0.4], dtype=torch.float64))
    torch.testing.assert_close(add["first_in_batch"], sine * torch.full((3,), 0.7, dtype=torch.float64))


@pytest.fixture(scope="module")
def edm_net():
    return load_edm(golden_path("edm_snapshot.pkl"))


def _edm_guidance(resnet, kw: dict) -> EluCDEDMGuidance:
    return EluCDEDMGuidance(copy.deepcopy(resnet), kw["max_guidance"], kw["softplus_beta"], kw["joint_temperature"],
                            kw["uncond_temperature"], kw["add_factor"])


@pytest.mark.parametrize("run", ["guided_custom", "guided_script", "unguided"])
def test_edm_sampler(edm, edm_net, resnet, run):
    r = edm["runs"][run]
    kw = r["kwargs"]
    sigmas = sigmas_karras(edm_net, kw["num_steps"], kw["sigma_min"], kw["sigma_max"], kw["rho"])
    torch.testing.assert_close(sigmas, r["t_steps"], rtol=0, atol=0)
    guidance = _edm_guidance(resnet, kw) if kw["use_classifier"] else NoGuidance()
    labels = r["class_idx"]
    torch.testing.assert_close(torch.eye(edm_net.num_classes)[labels], r["class_labels"], rtol=0, atol=0)

    if kw["use_classifier"]:
        guidance.begin(edm_net, sigmas, labels)
        torch.testing.assert_close(torch.tensor([guidance.weight(i) for i in range(kw["num_steps"])]),
                                   torch.tensor(r["w"]), atol=1e-12, rtol=0)
        for step in r["steps"]:
            i, x = step["i"], step["x_cur"]
            assert math.isclose(guidance.weight(i), step["w"], abs_tol=1e-12)
            torch.testing.assert_close(x.square().mean(dim=(1, 2, 3)).sqrt(), step["x_cur_norm"], rtol=1e-12, atol=0)
            _, objective = calibrated_objective_grad(guidance.classifier, step["classifier_input"], None, labels,
                                                     guidance.tau1, guidance.tau2)
            torch.testing.assert_close(objective, step["objective"], atol=1e-5, rtol=1e-5)
            moved = guidance.displace(edm_net, x, torch.full((len(x),), step["t_cur"], dtype=torch.float64), labels,
                                      step=i)
            scale_tol = 1e-4 if step["t_cur"] > 1 else 1e-5
            torch.testing.assert_close((moved - x).float(), step["guidance"], atol=scale_tol, rtol=1e-4)
            churn = (step["t_hat"] ** 2 - step["t_cur"] ** 2) ** 0.5 * kw["S_noise"] * step["eps"]
            torch.testing.assert_close(moved + churn, step["x_hat"], atol=scale_tol, rtol=1e-6)

    with torch.no_grad():
        images = sample_heun(edm_net, r["latents"].double() * sigmas[0], sigmas, labels, guidance=guidance,
                             rng=Replay([s["eps"] for s in r["steps"]]), S_churn=kw["S_churn"], S_min=kw["S_min"],
                             S_max=kw["S_max"], S_noise=kw["S_noise"])
    torch.testing.assert_close(images, r["images"], atol=1e-4, rtol=0)
    if run != "unguided":
        assert (r["images"] - edm["runs"]["unguided"]["images"]).abs().max() > 1e-2


def test_edm_zero_scale_moves_nothing(edm, edm_net, resnet):
    r = edm["runs"]["guided_script"]
    kw = {**r["kwargs"], "max_guidance": 0.0}
    guidance = _edm_guidance(resnet, kw)
    guidance.begin(edm_net, r["t_steps"], r["class_idx"])
    x = r["steps"][0]["x_cur"]
    assert torch.equal(guidance.displace(edm_net, x, torch.full((2,), 80.0), r["class_idx"], step=0), x)
