"""EDICT and DOODL against numbers made by salesforce/DOODL itself (edict.pt, README-doodl.md).

The original runs Stable Diffusion's eps-net in VP coordinates (x_t = sqrt(abar) x0 + sqrt(1 - abar) eps) with CFG
inside every step; here its tiny stand-in (TinyEps + the two stored text embeddings, CFG at the stored scale) is a
guidebench denoiser D(x; sigma) = x - sigma eps~(x / sqrt(1 + sigma^2), t) and the tests map VP latents at level
abar to sigma space (x = x_vp / sqrt(abar)) and back. The schedule is the original's: the fixture's timesteps
(ADM's ddimN spacing) and, after the last one, abar_0 again (set_alpha_to_one=False), not sigma = 0.
Tolerances: README-doodl.md ("Suggested tolerances").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guidebench.denoisers.base import Denoised
from guidebench.guidance.base import NoGuidance
from guidebench.guidance.doodl import DOODLGuidance, doodl_update
from guidebench.samplers import (ddim_move, edict_chain, edict_mix, edict_step, edict_step_inverse, edict_unmix,
                                 edict_vjp, invert_edict)
from guidebench.schedules import sigmas_respaced, space_timesteps
from tests.golden import load_golden

pytestmark = pytest.mark.golden

STEP = dict(atol=1e-5, rtol=0)     # UNet calls, single steps, mixing
CHAIN = dict(atol=5e-5, rtol=0)    # forward chains, chain_out
UPDATE = dict(atol=1e-6, rtol=1e-6)  # DOODL momentum and latents (|z| <= ~4: float32 ulps)


def assert_grad_close(ours, ref) -> None:
    """Gradients: rtol 1e-4 and an atol of 1e-5 of the largest element (the original's own float32 and float64
    gradients differ by 3.3e-6 of it; an element-wise 1e-7 fails for the near-zero ones)."""
    torch.testing.assert_close(ours.to(ref.dtype), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


class TinyEps(nn.Module):
    """README-doodl.md's stand-in eps-net: x + conv_out(silu(conv_in(x) + t_proj(temb(t)) + c_proj(mean_L(ehs))))."""

    def __init__(self, channels: int, hidden: int, embed_dim: int, num_freqs: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.t_proj, self.c_proj = nn.Linear(2 * num_freqs, hidden), nn.Linear(embed_dim, hidden)
        k = torch.arange(num_freqs, dtype=torch.float32)
        self.register_buffer("freqs", torch.exp(-math.log(10000) * k / num_freqs), persistent=False)

    def forward(self, x, t, ehs):
        tf = torch.as_tensor(t, dtype=x.dtype) * self.freqs
        h = self.conv_in(x) + self.t_proj(torch.cat([tf.cos(), tf.sin()]))[None, :, None, None]
        return x + self.conv_out(F.silu(h + self.c_proj(ehs.mean(dim=1))[:, :, None, None]))


class StandIn:
    """The stand-in SD pipeline as a VP denoiser: D(x; sigma) = x - sigma eps~, eps~ = eps_u + w (eps_c - eps_u)
    on x_vp = x / sqrt(1 + sigma^2) at the training step t whose sigma it is; records the eps calls (VP inputs)."""

    variance_preserving = True
    num_classes, null_label = 0, None

    def __init__(self, g: dict, guidance_scale: float):
        m = g["eps_model"]
        self.eps = TinyEps(m["C"], m["Hc"], m["D"], m["F"]).eval().requires_grad_(False)
        self.eps.load_state_dict(g["eps_model"]["state_dict"])
        self.uncond, self.cond = g["embeddings"]["uncond"], g["embeddings"]["cond"]
        abar = g["schedule"]["alphas_cumprod"]
        self.sigmas = ((1 - abar) / abar).sqrt()
        self.w, self.calls = guidance_scale, []

    def __call__(self, x, sigma, labels=None):
        t = (self.sigmas[None, :] - sigma[:, None]).abs().argmin(dim=1)
        assert (t == t[0]).all()
        x_vp = x / (1 + sigma.float().reshape(-1, 1, 1, 1) ** 2).sqrt()
        outs = []
        for cond, ehs in ((False, self.uncond), (True, self.cond)):
            out = self.eps(x_vp, float(t[0]), ehs.expand(len(x), -1, -1))
            self.calls.append({"x": x_vp.detach(), "cond": cond, "out": out.detach()})
            outs.append(out)
        eps = outs[0] + self.w * (outs[1] - outs[0])
        return Denoised(x - sigma.float().reshape(-1, 1, 1, 1) * eps)


@pytest.fixture(scope="module")
def g() -> dict:
    return load_golden("edict.pt")


def schedule(g: dict, standin: StandIn, steps: int) -> torch.Tensor:
    """The original's levels for `steps` steps: its timesteps, then abar_0 again (final_alpha_cumprod)."""
    sigmas = sigmas_respaced(standin, f"ddim{steps}")[:-1]
    final = g["schedule"]["final_alpha_cumprod"]
    return torch.cat([sigmas, torch.tensor([math.sqrt((1 - final) / final)], dtype=torch.float64)])


def to_sigma(x_vp, sigma):
    return x_vp.double() * math.sqrt(1 + float(sigma) ** 2)


def to_vp(x, sigma):
    return (x / math.sqrt(1 + float(sigma) ** 2)).float()


@pytest.fixture(scope="module")
def standin(g) -> StandIn:
    return StandIn(g, g["config"]["edict"]["guidance_scale"])


@pytest.fixture(scope="module")
def sigmas(g, standin) -> torch.Tensor:
    return schedule(g, standin, g["config"]["edict"]["steps"])


def test_schedule_is_the_originals(g, standin, sigmas):
    s = g["schedule"]
    n = s["num_inference_steps"]
    assert (s["beta_schedule"], s["clip_sample"], s["set_alpha_to_one"]) == ("scaled_linear", False, False)
    assert space_timesteps(s["num_train_timesteps"], f"ddim{n}")[::-1] == s["timesteps"].tolist()
    betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, s["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), s["alphas_cumprod"], atol=1e-12, rtol=0)
    abar = 1 / (1 + sigmas**2)
    torch.testing.assert_close(abar[:-1], s["alphas_cumprod"][s["timesteps"]], atol=1e-12, rtol=0)
    assert float(abar[-1]) == pytest.approx(s["final_alpha_cumprod"], abs=1e-12)


def test_ddim_forward_and_reverse_steps(g):
    d = g["ddim"]
    for step in d["steps"]:
        sigma, sigma_next = (math.sqrt((1 - a) / a) for a in (step["alpha_t"], step["alpha_prev"]))
        assert step["alpha_t"] + step["beta_t"] == pytest.approx(1)
        forward = ddim_move(to_sigma(d["sample"], sigma), d["eps"].double(), sigma, sigma_next)
        torch.testing.assert_close(to_vp(forward, sigma_next), step["forward"], **STEP)
        back = ddim_move(to_sigma(step["forward"], sigma_next), d["eps"].double(), sigma_next, sigma)
        torch.testing.assert_close(to_vp(back, sigma), step["reverse_of_forward"], **STEP)


def test_mixing_and_its_inverse(g):
    m = g["mixing"]
    torch.testing.assert_close(torch.stack(edict_mix(*m["x"], m["p"])), m["forward"], **STEP)
    torch.testing.assert_close(torch.stack(edict_unmix(*m["forward"], m["p"])), m["inverse_of_forward"], **STEP)
    torch.testing.assert_close(torch.stack(edict_unmix(*m["x"], m["p"])), m["inverse_of_x"], **STEP)


def assert_calls(calls: list, expected: list) -> None:
    assert [c["cond"] for c in calls] == [c["cond"] for c in expected]
    for c, e in zip(calls, expected):
        torch.testing.assert_close(c["x"], e["x"], **STEP)
        torch.testing.assert_close(c["out"], e["out"], **STEP)


def test_single_edict_steps_and_their_inverses(g, standin, sigmas):
    p, n = g["config"]["edict"]["mix_weight"], g["config"]["edict"]["steps"]
    for s in g["steps"]:
        k = s["index"]
        assert s["inverse_index"] == n - 1 - k  # the original's inverse loop index; guidebench inverts step k as k
        x, y = to_sigma(s["pair_in"], sigmas[k]).chunk(2)
        standin.calls = []
        out = edict_step(NoGuidance(), standin, x, y, sigmas, None, k, p)
        assert_calls(standin.calls, s["eps_calls"])
        torch.testing.assert_close(to_vp(torch.cat(out), sigmas[k + 1]), s["after_mix"], **STEP)
        torch.testing.assert_close(to_vp(torch.cat(edict_unmix(*out, p)), sigmas[k + 1]), s["after_step"], **STEP)
        standin.calls = []
        stored = to_sigma(s["after_mix"], sigmas[k + 1]).chunk(2)
        torch.testing.assert_close(to_vp(torch.cat(edict_unmix(*stored, p)), sigmas[k + 1]),
                                   s["inverse_after_unmix"], **STEP)
        back = edict_step_inverse(NoGuidance(), standin, *stored, sigmas, None, k, p)
        assert_calls(standin.calls, s["inverse_eps_calls"])
        torch.testing.assert_close(to_vp(torch.cat(back), sigmas[k]), s["inverse_out"], **STEP)
        assert (to_vp(torch.cat(back), sigmas[k]) - s["pair_in"]).abs().max() <= 10 * s["inverse_max_abs_err"] + 1e-6


def test_chain_and_its_inversion(g, standin, sigmas):
    c, p = g["chain"], g["config"]["edict"]["mix_weight"]
    n = len(sigmas) - 1
    x_t = to_sigma(c["x_T"], sigmas[0])
    traj = [torch.cat([x_t, x_t])]
    edict_chain(standin, x_t, x_t, sigmas, mix=p, callback=lambda d: traj.append(torch.cat([d["x"], d["y"]])))
    ours = torch.stack([to_vp(t, sigmas[k]) for k, t in enumerate(traj)])
    torch.testing.assert_close(ours, c["fwd_traj"], **CHAIN)
    torch.testing.assert_close(c["nested_chain_final"], c["fwd_traj"][-1], atol=0, rtol=0)
    before_mix = torch.stack([to_vp(torch.cat(edict_unmix(*t.chunk(2), p)), sigmas[k + 1])
                              for k, t in enumerate(traj[1:])])
    torch.testing.assert_close(before_mix, c["step_out_before_mix"], **CHAIN)
    pair = to_sigma(c["fwd_traj"][-1], sigmas[n]).chunk(2)
    for j, k in enumerate(reversed(range(n)), start=1):  # inversion trajectory from the stored final pair
        pair = edict_step_inverse(NoGuidance(), standin, *pair, sigmas, None, k, p)
        torch.testing.assert_close(to_vp(torch.cat(pair), sigmas[k]), c["inv_traj"][j], **CHAIN)
    recon = torch.cat(invert_edict(standin, *traj[-1].chunk(2), sigmas, mix=p)) - torch.cat([x_t, x_t])
    assert recon.abs().max() / math.sqrt(1 + float(sigmas[0]) ** 2) <= 10 * c["recon_max_abs_err"]


def test_editing_direction(g, standin, sigmas):
    e, p = g["edit"], g["config"]["edict"]["mix_weight"]
    z0 = to_sigma(e["z_0"], sigmas[-1])
    inverted = invert_edict(standin, z0, z0, sigmas, mix=p)
    torch.testing.assert_close(to_vp(torch.cat(inverted), sigmas[0]), e["inverted_pair"], **CHAIN)
    again = edict_chain(standin, *to_sigma(e["inverted_pair"], sigmas[0]).chunk(2), sigmas, mix=p)
    torch.testing.assert_close(to_vp(torch.cat(again), sigmas[-1]), e["regenerated_pair"], **CHAIN)


class TinyVAE(nn.Module):
    def __init__(self, g: dict):
        super().__init__()
        self.conv, self.scale_factor = nn.Conv2d(4, 3, 1), g["vae"]["scale_factor"]
        self.load_state_dict(g["vae"]["state_dict"])
        self.requires_grad_(False)

    def forward(self, latent_vp):
        return self.conv(latent_vp.float() / self.scale_factor)


def symmetry_loss(vae: TinyVAE, x, sigma, weight: float) -> torch.Tensor:
    """salesforce/DOODL symmetry_loss_fn('horizontal', weight) of each decoded final latent (sigma space), [B]."""
    im = vae(x / math.sqrt(1 + float(sigma) ** 2))
    return weight * (im - im.flip(-1)).square().flatten(1).mean(dim=1)


def test_gradient_through_the_chain_by_inversion(g, standin, sigmas):
    """dL/d(x_T, y_T) of the symmetry loss on both outputs: the chain inverted step by step (edict_vjp)."""
    c, p, vae = g["chain"], g["config"]["edict"]["mix_weight"], TinyVAE(g)
    x_t = to_sigma(c["x_T"], sigmas[0])
    final = edict_chain(standin, x_t, x_t, sigmas, mix=p)
    with torch.enable_grad():
        pair = torch.cat(final).requires_grad_(True)
        loss = symmetry_loss(vae, pair, sigmas[-1], 1.0).sum()
        grad_x, grad_y = torch.autograd.grad(loss, pair)[0].chunk(2)
    assert float(loss.detach()) == pytest.approx(g["grad"]["loss_value"], rel=1e-5)
    _, grads = edict_vjp(standin, *final, grad_x, grad_y, sigmas, mix=p)
    ours = torch.cat(grads) * math.sqrt(1 + float(sigmas[0]) ** 2)  # d/dx_vp = d/dx * sqrt(1 + sigma_0^2)
    assert g["grad"]["memcnn_vs_plain_max_abs"] == 0
    assert_grad_close(ours, g["grad"]["grad_memcnn"])
    assert_grad_close(ours, g["grad"]["grad_float64"])


class SymmetryDOODL(DOODLGuidance):
    """DOODL with the fixture's loss (symmetry of the decoded latent) in place of the classifier's cross-entropy."""

    def __init__(self, vae, sigma_end, grad_scale, **kwargs):
        super().__init__(classifier=None, scale=grad_scale, **kwargs)
        self.vae, self.sigma_end = vae, sigma_end

    def loss(self, x0, labels):
        return symmetry_loss(self.vae, x0, self.sigma_end, self.scale)


class Replay:
    """An rng whose randn returns the stored perturbations / noise_scale in order."""

    def __init__(self, draws):
        self.draws = list(draws)

    def randn(self, shape, dtype=torch.float32):
        return self.draws.pop(0).reshape(shape).to(dtype)


def test_doodl_update_rule(g):
    """Each iteration's update from the stored gradient: clip, momentum, shared noise, renormalisation."""
    d, s = g["doodl"], g["doodl"]["settings"]
    assert s["tied_latents"] and s["renormalize_latents"] and not s["optimize_first_edict_image_only"]
    momentum = None
    for it in d["iterations"]:
        assert it["momentum_pair_equal"]
        direction = -0.5 * it["grad_raw"].mean(dim=0, keepdim=True)
        torch.testing.assert_close(direction, it["grad_tied"], atol=1e-9, rtol=1e-6)
        z, momentum = doodl_update(it["latent_pair_in"][:1], it["grad_tied"], momentum, it["perturbation"][None],
                                   torch.tensor([d["orig_norm"]]), s["clip_grad_val"], s["momentum"], s["use_nesterov"])
        torch.testing.assert_close(momentum, it["momentum"], **UPDATE)
        last = it["m"] + 1 == len(d["iterations"])
        nxt = it["latent_pair_out"] if last else d["iterations"][it["m"] + 1]["latent_pair_in"]
        torch.testing.assert_close(torch.cat([z, z]), nxt, **UPDATE)


def test_doodl_iterations(g):
    """DOODL's loop end to end (its chain, loss, gradient by inversion, update) against gen()'s state per iteration."""
    d, s = g["doodl"], g["doodl"]["settings"]
    standin = StandIn(g, s["sd_guidance_scale"])
    sigmas = schedule(g, standin, s["steps"])
    method = SymmetryDOODL(TinyVAE(g), sigmas[-1], s["grad_scale"], num_iterations=s["num_traversal_steps"],
                           clip_grad=s["clip_grad_val"], momentum=s["momentum"] if s["use_momentum"] else 0.0,
                           nesterov=s["use_nesterov"], noise_scale=s["perturb_grad_scale"],
                           renormalize=s["renormalize_latents"])
    records = []
    rng = Replay([it["perturbation"] / s["perturb_grad_scale"] for it in d["iterations"]])
    assert float(d["latent"].norm()) == pytest.approx(d["orig_norm"], rel=1e-6)
    z = method.optimise(standin, d["latent"].double(), sigmas, torch.zeros(len(d["latent"]), dtype=torch.long), rng,
                        callback=records.append, mix=s["mix_weight"])
    assert len(records) == len(d["iterations"])
    for r, it in zip(records, d["iterations"]):
        torch.testing.assert_close(torch.cat([r["z"], r["z"]]).float(), it["latent_pair_in"], **UPDATE)
        torch.testing.assert_close(to_vp(torch.cat(r["final"]), sigmas[-1]), it["chain_out"], **CHAIN)
        torch.testing.assert_close(r["loss"].flatten().tolist(), it["losses"], atol=0, rtol=1e-5)
        assert_grad_close(torch.cat(r["grad"]), it["grad_raw"])
        assert_grad_close(r["direction"], it["grad_tied"])
    torch.testing.assert_close(torch.cat([z, z]).float(), d["iterations"][-1]["latent_pair_out"], **UPDATE)
