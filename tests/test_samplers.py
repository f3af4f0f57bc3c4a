"""Solvers against closed forms: the Gaussian probability-flow ODE, and the Gaussian marginal."""

import math

import pytest
import torch

from guidebench.denoisers import Denoised
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim, sample_ddpm, sample_heun
from guidebench.schedules import sigmas_karras, sigmas_respaced, space_timesteps
from tests.analytic import GaussianDenoiser, gaussian_vp

MUS = torch.tensor([0.7, -0.3]).reshape(2, 1, 1, 1).expand(2, 1, 4, 4).clone()


def ode_endpoint(x_start, mu, s, sigma0):
    """Exact PF-ODE solution at sigma = 0 for N(mu, s^2) data."""
    return mu + (x_start - mu) * s / math.sqrt(s**2 + sigma0**2)


def start(den, n, sigma0, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    mu = den.mu(labels).to(torch.float64)
    x = mu + math.sqrt(den.s**2 + sigma0**2) * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, labels, mu


@pytest.mark.parametrize("solver,order", [(sample_ddim, 1), (sample_heun, 2)])
def test_ode_solvers_converge_at_their_order(solver, order):
    den = GaussianDenoiser(MUS, s=0.5)
    errors = []
    for n in (8, 16, 32):
        sigmas = sigmas_karras(den, n, sigma_min=0.02, sigma_max=10.0)
        x, labels, mu = start(den, 64, float(sigmas[0]))
        out = solver(den, x, sigmas, labels)
        # reference: the exact ODE from sigmas[0] down to the last nonzero sigma, then one exact D step
        s_last = float(sigmas[-2])
        x_last = mu + (x - mu) * math.sqrt((0.25 + s_last**2) / (0.25 + float(sigmas[0]) ** 2))
        ref = mu + 0.25 / (0.25 + s_last**2) * (x_last - mu)
        errors.append((out - ref).abs().max().item())
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(r > order - 0.35 for r in rates), (errors, rates)


def test_heun_lands_on_the_data_distribution():
    den = GaussianDenoiser(MUS, s=0.5)
    sigmas = sigmas_karras(den, 40, sigma_min=0.002, sigma_max=80.0)
    x, labels, mu = start(den, 2000, 80.0)
    out = sample_heun(den, x, sigmas, labels)
    resid = out - mu
    assert abs(resid.mean().item()) < 0.01
    assert resid.std().item() == pytest.approx(0.5, rel=0.01)
    exact = ode_endpoint(x, mu, 0.5, 80.0)
    assert (out - exact).abs().mean().item() < 5e-3  # 40 Heun steps from sigma = 80


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_ancestral_samples_the_marginal(variance):
    mus = torch.tensor([0.7, -0.3]).reshape(2, 1, 1, 1).expand(2, 1, 16, 16).clone()
    den = gaussian_vp(mus, s=0.5)
    sigmas = sigmas_respaced(den, "250")
    n = 64
    rng = StackedRandomGenerator("cpu", range(n))
    x = rng.randn([n, 1, 16, 16], dtype=torch.float64) * math.sqrt(1 + float(sigmas[0]) ** 2)
    labels = torch.arange(n) % 2
    out = sample_ddpm(den, x, sigmas, labels, rng=rng, variance=variance)
    resid = out - den.net.gaussian.mu(labels)
    assert abs(resid.mean().item()) < 0.02
    assert resid.std().item() == pytest.approx(0.5, rel=0.03)


def test_ddim_eta1_equals_ddpm_fixed_small():
    den = gaussian_vp(MUS, s=0.5)
    sigmas = sigmas_respaced(den, "50")
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 100
    labels = torch.tensor([0, 1, 0, 1])
    a = sample_ddpm(den, x, sigmas, labels, rng=StackedRandomGenerator("cpu", [0, 1, 2, 3]))
    b = sample_ddim(den, x, sigmas, labels, rng=StackedRandomGenerator("cpu", [0, 1, 2, 3]), eta=1.0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_learned_variance_interpolates_between_beta_tilde_and_beta():
    """Nichol & Dhariwal eq. 15: v = 0 gives beta_tilde, v = 1 gives beta, v = 1/2 their geometric mean."""

    class ConstantVariance(torch.nn.Module):
        def __init__(self, den, frac):
            super().__init__()
            self.den, self.frac = den, frac
            for k in ("img_channels", "img_resolution", "num_classes", "null_label", "sigma_min", "sigma_max"):
                setattr(self, k, getattr(den, k))

        def round_sigma(self, s):
            return self.den.round_sigma(s)

        def forward(self, x, sigma, labels):
            return Denoised(torch.zeros_like(x), torch.full_like(x, self.frac))

    den = gaussian_vp(MUS)
    sigmas = sigmas_respaced(den, "10")
    x = torch.zeros(8, 1, 4, 4, dtype=torch.float64)

    def first_step(frac, variance):
        seen = []
        sample_ddpm(ConstantVariance(den, frac), x, sigmas, None, rng=StackedRandomGenerator("cpu", range(8)),
                    variance=variance, callback=lambda d: seen.append(d["x"]) if d["i"] == 0 else None)
        return seen[0]  # mean 0, so this is sqrt(Sigma) z

    small, large = first_step(0.0, "fixed_small"), first_step(1.0, "fixed_large")
    torch.testing.assert_close(first_step(0.0, "learned"), small)
    torch.testing.assert_close(first_step(1.0, "learned"), large)
    torch.testing.assert_close(first_step(0.5, "learned").abs(), (small * large).sqrt())
    assert (large.abs() > small.abs()).all()


def test_space_timesteps_matches_adm_conventions():
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    kept = space_timesteps(1000, "25")
    assert len(kept) == 25 and kept[0] == 0 and kept[-1] == 999
    assert kept[:4] == [0, 42, 83, 125]  # stride 999 / 24 = 41.625, rounded
    assert space_timesteps(100, "10,10") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49] + [50, 55, 61, 66, 72, 77, 83, 88, 94, 99]
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError):
        space_timesteps(100, "60,10")
