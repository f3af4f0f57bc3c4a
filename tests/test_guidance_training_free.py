"""The training-free family (DPS, FreeDoM, MPGD, UGD, LGD, TFG) on a closed-form Gaussian denoiser and a linear
classifier: each update written out here, the special cases of TFG, recurrence, per-sample noise, bad input, and
runs on the shipped digits models."""

import json
import math

import pytest
import torch

from guidebench.denoisers import Denoised
from guidebench.guidance import (DPSGuidance, FreeDoMGuidance, LossGuidedDiffusion, MPGDGuidance, NoGuidance,
                                 TrainingFreeGuidance, UniversalGuidance)
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import ddpm_step_moments, sample_ddim, sample_ddpm, sample_heun
from tests.analytic import MUS, GaussianDenoiser, LinearClassifier
from tests.test_cli import cli

SIGMAS = torch.tensor([3.0, 1.6, 0.7, 0.2, 0.0], dtype=torch.float64)
S2 = 0.5**2  # the Gaussian's data variance: D(x; sigma) = s^2 / (s^2 + sigma^2) x, dD/dx = that factor


class Uncond(GaussianDenoiser):
    """The unconditional Gaussian N(0, s^2 I), whatever label it is given; records whether an input carried grad."""

    def __init__(self, mus):
        super().__init__(mus)
        self.with_grad = []

    def forward(self, x, sigma, labels):
        self.with_grad.append(bool(torch.is_grad_enabled() and x.requires_grad))
        return super().forward(x, sigma, None)


def setup(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    clf = LinearClassifier(0.7 * torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, generator=g))
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) * 3
    return Uncond(MUS), clf, x, torch.randint(0, 3, (n,), generator=g)


def k(sigma):
    return (S2 / (S2 + sigma**2)).reshape(-1, 1, 1, 1)


def log_p(clf, x0, y):
    return torch.log_softmax(clf(x0.float(), None).double(), -1)[torch.arange(len(y)), y]


def b(i):  # grad_{x_t} added to x_{t-1}, in sigma space
    return math.sqrt((1 + SIGMAS[i] ** 2) * (1 + SIGMAS[i + 1] ** 2))


def alpha(i):
    return float((1 + SIGMAS[i + 1] ** 2) / (1 + SIGMAS[i] ** 2))


def increase(i):  # TFG's normalised 'increase' schedule
    return alpha(i) * (len(SIGMAS) - 1) / sum(alpha(j) for j in range(len(SIGMAS) - 1))


def ddim_by_hand(x, shift_fn):
    """DDIM eta = 0 of the Gaussian with TFG's additive shift of the next state: x' = x0 + (s'/s)(x - x0) + S."""
    for i in range(len(SIGMAS) - 1):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        x0 = k(s.expand(len(x))) * x
        x = x0 + s_next / s * (x - x0) + shift_fn(x0, i)
    return x


def test_dps_is_the_gradient_through_the_denoiser_normalised_by_the_log_likelihood():
    den, clf, x, y = setup()
    zeta = 0.8
    expected = ddim_by_hand(x, lambda x0, i: zeta * b(i) * k(SIGMAS[i].expand(len(x))) * clf.grad_log_prob(
        x0.float(), y).double() / log_p(clf, x0, y).abs().reshape(-1, 1, 1, 1))
    out = sample_ddim(den, x, SIGMAS, y, guidance=DPSGuidance(clf, zeta))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert any(den.with_grad) and (out - sample_ddim(den, x, SIGMAS, y)).abs().max() > 1e-2


def test_dps_gradient_equals_autograd_through_the_denoiser():
    den, clf, x, y = setup()
    sigma = torch.full((len(x),), 1.6, dtype=torch.float64)
    g = LossGuidedDiffusion(clf, 1.0, n_mc=1, gamma=0.0)
    g.begin(den, SIGMAS, y)
    _, shift = g.guide(den, x, sigma, y, step=1)
    xr = x.float().requires_grad_(True)
    direct = torch.autograd.grad(log_p(clf, den(xr, sigma, None).x0, y).sum(), xr)[0]
    torch.testing.assert_close(shift, b(1) * direct, rtol=1e-5, atol=1e-6)


def test_tfg_step_written_out_and_exact_on_ddpm():
    """rho, mu with N_iter = 2 x0 steps, 'increase' schedules; the DDPM mean form lands at mu + S, noise replayed."""
    den, clf, x, y = setup()
    rho, mu = 0.5, 0.3
    tfg = TrainingFreeGuidance(clf, rho, mu=mu, gamma=0.0, n_iter=2)

    def shift(x0, i):
        sig = SIGMAS[i].expand(len(x0))
        delta = torch.zeros_like(x0)
        for _ in range(2):
            delta = delta + mu * increase(i) * clf.grad_log_prob((x0 + delta).float(), y).double()
        return rho * increase(i) * (1 + SIGMAS[i] ** 2) * k(sig) * clf.grad_log_prob(x0.float(), y).double() + delta

    z = torch.randn(len(SIGMAS), *x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = x
    for i in range(len(SIGMAS) - 1):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        x0 = k(s.expand(len(x))) * expected
        _, var = ddpm_step_moments(expected, Denoised(x0.float()), SIGMAS, i)  # fixed-small: not x0's
        mean = x0 + s_next**2 / s**2 * (expected - x0) + shift(x0, i)
        expected = mean + var.sqrt() * z[i] if s_next > 0 else mean

    class Replay:
        def __init__(self):
            self.i = 0

        def randn_like(self, t):
            self.i += 1
            return z[self.i - 1].to(t)

    out = sample_ddpm(den, x, SIGMAS, y, guidance=tfg, rng=Replay())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    ddim = sample_ddim(den, x, SIGMAS, y, guidance=tfg)
    torch.testing.assert_close(ddim, ddim_by_hand(x, shift), rtol=1e-5, atol=1e-5)


def test_mpgd_is_the_x0_space_step_without_backprop_through_the_denoiser_and_tfg_reproduces_it():
    den, clf, x, y = setup()
    c = 0.7
    out = sample_ddim(den, x, SIGMAS, y, guidance=MPGDGuidance(clf, c))
    assert den.with_grad and not any(den.with_grad)  # no denoiser forward ever carried grad
    torch.testing.assert_close(out, ddim_by_hand(x, lambda x0, i: c * clf.grad_log_prob(x0.float(), y).double()),
                               rtol=1e-5, atol=1e-5)
    tfg = TrainingFreeGuidance(clf, 0.0, mu=c, gamma=0.0, n_iter=1, mu_schedule="constant")
    assert torch.equal(sample_ddim(den, x, SIGMAS, y, guidance=tfg), out)


def test_special_cases_of_one_gradient_step():
    """LGD with K = 1, gamma = 0 is DPS times |l| and FreeDoM without recurrence on a constant schedule; TFG's
    variance guidance is FreeDoM's divided by sqrt(alpha_t)."""
    den, clf, x, y = setup()
    sigma = SIGMAS[2].expand(len(x))

    def shift(g):
        g.begin(den, SIGMAS, y)
        return g.guide(den, x, sigma, y, step=2)[1]

    lgd = shift(LossGuidedDiffusion(clf, 0.6, n_mc=1, gamma=0.0))
    l = log_p(clf, k(sigma) * x, y).abs().float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(shift(DPSGuidance(clf, 0.6)) * l, lgd, rtol=1e-5, atol=1e-6)
    assert torch.equal(shift(FreeDoMGuidance(clf, 0.6, n_recur=1, rho_schedule="constant")), lgd)
    freedom = shift(FreeDoMGuidance(clf, 0.6, n_recur=1))
    tfg = shift(TrainingFreeGuidance(clf, 0.6, mu=0.0, gamma=0.0, n_iter=0))
    torch.testing.assert_close(tfg * math.sqrt(alpha(2)), freedom, rtol=1e-5, atol=1e-6)


def test_lgd_monte_carlo_objective_written_out():
    den, clf, x, y = setup()
    n, sigma = 3, SIGMAS[1].expand(len(x))
    g = LossGuidedDiffusion(clf, 1.0, n_mc=n, gamma=1.0)
    g.begin(den, SIGMAS, y, rng=StackedRandomGenerator("cpu", range(len(x))))
    _, shift = g.guide(den, x, sigma, y, step=1)
    twin = StackedRandomGenerator("cpu", range(len(x)))
    r = (sigma / (1 + sigma**2).sqrt()).reshape(-1, 1, 1, 1)
    points = [k(sigma) * x + r * twin.randn_like(x.float()).double() for _ in range(n)]
    weights = torch.softmax(torch.stack([log_p(clf, p, y) for p in points]), 0)  # grad of log mean exp
    grad = sum(w.reshape(-1, 1, 1, 1) * clf.grad_log_prob(p.float(), y).double() for w, p in zip(weights, points))
    torch.testing.assert_close(shift.double(), b(1) * k(sigma) * grad, rtol=1e-5, atol=1e-6)


def test_ugd_guides_the_prediction_itself_on_every_solver_form():
    den, clf, x, y = setup()
    s, sigma = 0.4, SIGMAS[1].expand(len(x))
    ugd = UniversalGuidance(clf, s, n_iter=2, n_recur=1)
    ugd.begin(den, SIGMAS, y)
    x0 = k(sigma) * x
    delta = torch.zeros_like(x0)
    for _ in range(2):
        delta = delta + s * clf.grad_log_prob((x0 + delta).float(), y).double()
    expected = x0 + s * sigma.reshape(-1, 1, 1, 1) ** 2 * k(sigma) * clf.grad_log_prob(x0.float(), y).double() + delta
    for mean_form in (False, True):
        out = ugd(den, x.float(), sigma, y, mean_form=mean_form, step=1).x0
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_recurrence_rounds_written_out_and_one_round_is_the_plain_step():
    den, clf, x, y = setup()
    sigma, s_next = SIGMAS[1].expand(len(x)), SIGMAS[2]
    plain = FreeDoMGuidance(clf, 0.5, n_recur=1)
    plain.begin(den, SIGMAS, y, rng=StackedRandomGenerator("cpu", range(len(x))))
    assert torch.equal(plain.displace(den, x, sigma, y, step=1), x) and not den.calls
    g = FreeDoMGuidance(clf, 0.5, n_recur=3)
    g.begin(den, SIGMAS, y, rng=StackedRandomGenerator("cpu", range(len(x))))
    out = g.displace(den, x, sigma, y, step=1)
    twin, expected = StackedRandomGenerator("cpu", range(len(x))), x
    for _ in range(2):  # N_recur - 1 rounds; the solver makes the last one
        x0 = k(sigma) * expected
        step = 0.5 * increase(1) * b(1) * k(sigma) * clf.grad_log_prob(x0.float(), y).double()
        expected = x0 + s_next / SIGMAS[1] * (expected - x0) + step
        expected = expected + (SIGMAS[1] ** 2 - s_next**2).sqrt() * twin.randn_like(expected)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", [sample_ddim, sample_ddpm, sample_heun], ids=["ddim", "ddpm", "heun"])
def test_zero_strength_is_unguided_on_every_solver(solver):
    den, clf, x, y = setup()
    for g in (TrainingFreeGuidance(clf, 0.0, mu=0.0, gamma=0.0), DPSGuidance(clf, 0.0), MPGDGuidance(clf, 0.0)):
        a = solver(den, x, SIGMAS, y, guidance=g, rng=StackedRandomGenerator("cpu", range(len(x))))
        ref = solver(den, x, SIGMAS, y, guidance=NoGuidance(), rng=StackedRandomGenerator("cpu", range(len(x))))
        torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)


def test_heun_lands_at_the_average_of_its_two_stage_shifts():
    """Score form: the Euler stage lands at Euler + S_1; the trapezoid averages the stages' shifts S_1, S_2."""
    den, clf, x, y = setup()
    g, sig = DPSGuidance(clf, 0.5), SIGMAS[1:]
    after = []
    sample_heun(den, x, sig, y, guidance=g, callback=lambda d: after.append(d["x"]))
    s0, s1 = sig[0].expand(len(x)), sig[1].expand(len(x))
    x0 = k(s0) * x
    x_euler = x0 + sig[1] / sig[0] * (x - x0) + g.guide(den, x, s0, y, 0)[1].double()
    x0_next = k(s1) * x_euler
    shifts = g.guide(den, x, s0, y, 0)[1].double() + g.guide(den, x_euler, s1, y, 0)[1].double()
    expected = x + (sig[1] - sig[0]) * ((x - x0) / sig[0] + (x_euler - x0_next) / sig[1]) / 2 + shifts / 2
    torch.testing.assert_close(after[0], expected, rtol=1e-5, atol=1e-5)


def test_a_sample_does_not_depend_on_its_batch():
    den, clf, x, y = setup(n=5)
    g = TrainingFreeGuidance(clf, 0.5, mu=0.2, gamma=0.3, n_mc=2, n_iter=1, n_recur=2)
    full = sample_ddpm(den, x, SIGMAS, y, guidance=g, rng=StackedRandomGenerator("cpu", range(5)))
    part = sample_ddpm(den, x[2:4], SIGMAS, y[2:4], guidance=g, rng=StackedRandomGenerator("cpu", [2, 3]))
    torch.testing.assert_close(part, full[2:4], rtol=1e-6, atol=1e-6)


class Detaching(torch.nn.Module):
    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, x, sigma):
        return self.clf(x.detach(), sigma)


class Rounding(Detaching):
    def forward(self, x, sigma):
        return self.clf(torch.round(x * 4) / 4, sigma)


@pytest.mark.parametrize("method", [TrainingFreeGuidance, DPSGuidance, FreeDoMGuidance, MPGDGuidance,
                                    UniversalGuidance, LossGuidedDiffusion])
def test_check_refuses_a_missing_or_non_differentiable_classifier(method):
    den, clf, _, _ = setup()
    with pytest.raises(ValueError, match="classifier=NAME"):
        method(None).check(den, sample_ddim)
    with pytest.raises(ValueError, match="passes no gradient to its input.*differentiable classifier"):
        method(Detaching(clf)).check(den, sample_ddim)
    with pytest.raises(ValueError, match="passes a zero or non-finite gradient.*differentiable classifier"):
        method(Rounding(clf)).check(den, sample_ddim)
    method(clf).check(den, sample_heun)  # every solver runs it
    unlabelled = Uncond(MUS)
    unlabelled.num_classes = 0
    with pytest.raises(ValueError, match="no label space"):
        method(clf).check(unlabelled, sample_ddim)


def test_bad_parameters_are_refused_with_the_key_to_fix():
    clf = setup()[1]
    for kwargs, key in [({"n_recur": 0}, "n_recur"), ({"n_iter": -1}, "n_iter"), ({"n_mc": 0}, "n_mc"),
                        ({"rho_schedule": "cosine"}, "rho_schedule"),
                        ({"gamma_schedule": "increase"}, "gamma_schedule"), ({"gamma": -0.1}, "gamma")]:
        with pytest.raises(ValueError, match=f"guidance.{key}"):
            TrainingFreeGuidance(clf, **kwargs)
    den, _, _, y = setup()
    for g in (TrainingFreeGuidance(clf, n_recur=2), LossGuidedDiffusion(clf)):
        with pytest.raises(ValueError, match="needs an rng"):
            g.begin(den, SIGMAS, y)


@pytest.mark.slow
@pytest.mark.parametrize("method, nfe, classifier_nfe", [(["guidance=dps"], 20, 10),
                                                         (["guidance=tfg", "guidance.scale=0.5"], 20, 50)],
                         ids=["dps", "tfg"])
def test_cli_runs_on_digits(tmp_path, method, nfe, classifier_nfe):
    """guidebench-run on the unconditional digits model with the clean classifier (DDIM-10: 2 NFE a guided step;
    TFG also takes 4 x0 steps, 5 classifier passes a step). ~1 min each on 2 loaded cores: slow."""
    run = tmp_path / "run"
    cli("guidebench-run", "backbone=digits_uncond", *method, "classifier=digits_clean", "sampling.num_samples=32",
        "sampler.schedule.respacing=ddim10", f"hydra.run.dir={run}", "evaluation.cache_dir=" + str(tmp_path / "cache"),
        cwd=tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((run / "run.json").read_text())
    assert metrics["num_samples"] == 32 and metrics["accuracy"] > 0.5  # unguided: ~0.1 (README)
    assert (manifest["nfe"], manifest["classifier_nfe"]) == (nfe, classifier_nfe)
