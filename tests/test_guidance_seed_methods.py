"""EDS and EluCD on closed-form denoisers and classifiers: the formulas written out, the interface calls, bad input."""

import math

import pytest
import torch

from guidebench.guidance import ClassifierGuidance, EluCDEDMGuidance, EluCDGuidance, EntropyDrivenGuidance, Guidance
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim, sample_ddpm, sample_heun
from guidebench.schedules import sigmas_karras
from tests.analytic import MUS, GaussianDenoiser, LinearClassifier, batch


def classifier(seed=1, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    return LinearClassifier(gain * torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, generator=g))


def test_eds_scale_is_s_ln_c_over_entropy_per_sample():
    den, clf = GaussianDenoiser(MUS), classifier(gain=0.5)
    x, sigma, y = batch()
    log_p = torch.log_softmax(clf(x, sigma).double(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    s_b = (2.0 * math.log(3) / entropy).float()
    assert (s_b >= 2.0).all() and s_b.max() / s_b.min() > 1.05  # per sample, never below s
    out = EntropyDrivenGuidance(clf, 2.0)(den, x, sigma, y).x0
    expected = den(x, sigma, y).x0 + (s_b * sigma.float() ** 2).reshape(-1, 1, 1, 1) * clf.grad_log_prob(x, y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    ln1000 = EntropyDrivenGuidance(clf, 2.0, entropy_classes=1000).sample_scale(clf(x, sigma))
    torch.testing.assert_close(ln1000, s_b * math.log(1000) / math.log(3))


def test_eds_at_a_uniform_prediction_is_plain_classifier_guidance():
    den = GaussianDenoiser(MUS)
    flat = LinearClassifier(torch.zeros(3, 1, 4, 4), torch.zeros(3))
    x, sigma, y = batch()
    torch.testing.assert_close(EntropyDrivenGuidance(flat, 4.0)(den, x, sigma, y).x0,
                               ClassifierGuidance(flat, 4.0)(den, x, sigma, y).x0)
    with pytest.raises(ValueError, match="entropy_classes"):
        EntropyDrivenGuidance(flat, 1.0, entropy_classes=1)


class Recorder(Guidance):
    """Logs the interface calls a solver makes."""

    def __init__(self):
        self.log = []

    def begin(self, denoiser, sigmas, labels, rng=None):
        self.log.append(("begin", len(sigmas)))

    def displace(self, denoiser, x, sigma, labels, step=None):
        self.log.append(("displace", step))
        return x

    def __call__(self, denoiser, x, sigma, labels, mean_form=False, step=None):
        self.log.append(("call", step, mean_form))
        return denoiser(x, sigma, labels)

    def mean_shift(self, denoiser, x, sigma, sigma_next, labels, variance, den=None, step=None):
        self.log.append(("shift", step, den is not None))
        return None


@pytest.mark.parametrize("solver", [sample_ddim, sample_ddpm, sample_heun])
def test_solvers_drive_the_interface_in_order(solver):
    den = GaussianDenoiser(MUS)
    sigmas = sigmas_karras(den, 3)
    rec = Recorder()
    x, _, y = batch(2)
    solver(den, x.double() * 80, sigmas, y, guidance=rec, rng=StackedRandomGenerator("cpu", [0, 1]))
    per_step = {"sample_ddim": lambda i: [("displace", i), ("call", i, False)],
                "sample_ddpm": lambda i: [("displace", i), ("call", i, True), ("shift", i, True)],
                "sample_heun": lambda i: [("displace", i), ("call", i, False)] + [("call", i, False)] * (i < 2)}
    expected = [("begin", 4)] + [e for i in range(3) for e in per_step[solver.__name__](i)]
    assert rec.log == expected


def test_elucd_ddpm_refuses_a_score_form_solver_before_sampling():
    den, clf = GaussianDenoiser(MUS), classifier()
    guidance = EluCDGuidance(clf, softplus_beta=None)
    guidance.check(den, sample_ddpm)
    with pytest.raises(ValueError, match="sampler=ddpm"):
        guidance.check(den, sample_ddim)
    x, sigma, y = batch()
    with pytest.raises(ValueError, match="sampler=ddpm"):
        guidance(den, x, sigma, y)


def test_elucd_ddpm_shift_is_the_formula():
    """mu' - mu = (Sigma + a_t) s grad_{x0}[tau1 f_y - logsumexp(tau2 f)] in VP, times sqrt(1 + sigma'^2)."""
    den, clf = GaussianDenoiser(MUS), classifier()
    x, _, y = batch()
    sigmas = torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    g = EluCDGuidance(clf, scale=2.0, softplus_beta=None, joint_temperature=1.3, margin_temperature_discount=0.6,
                      gamma_factor=0.7)
    g.begin(den, sigmas, y)
    step, sigma, sigma_next = 1, sigmas[1].expand(5), sigmas[2].expand(5)
    variance = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    d = den(x, sigma, y)
    shift = g.mean_shift(den, x, sigma, sigma_next, y, variance, den=d, step=step)
    x0 = d.x0.detach().requires_grad_(True)
    f = clf(x0, sigma)
    obj = 1.3 * f[torch.arange(5), y] - torch.logsumexp(0.78 * f, -1)
    grad = torch.autograd.grad(obj.sum(), x0)[0].double()
    to_vp = 1 + 0.5**2
    var_vp = variance / to_vp
    a = 0.7 * math.sin(math.pi * 1 / 3) * var_vp[:, 0, 0, 0]  # t = K - 1 - i = 1 of K = 3; max over one step
    expected = (var_vp + a.reshape(-1, 1, 1, 1)) * 2.0 * grad * math.sqrt(to_vp)
    torch.testing.assert_close(shift, expected, rtol=1e-5, atol=1e-7)


def test_elucd_edm_moves_each_sample_by_w_times_its_rms():
    den, clf = GaussianDenoiser(MUS), classifier()
    x, _, y = batch()
    x = x.double() * torch.tensor([0.5, 2, 3, 0.9, 10], dtype=torch.float64).reshape(-1, 1, 1, 1)
    sigmas = sigmas_karras(den, 5)
    g = EluCDEDMGuidance(clf, scale=0.03, softplus_beta=None, add_factor=0.8)
    g.begin(den, sigmas, y)
    for i in range(5):
        w = max(0.03 * (6 - i) / 6, 1e-5) + math.sin(math.pi * i / 5) * 0.03 * 0.8
        assert g.weight(i) == pytest.approx(w, rel=1e-12)
        moved = g.displace(den, x, sigmas[i].expand(5), y, step=i) - x
        rms = x.square().mean(dim=(1, 2, 3)).sqrt()
        torch.testing.assert_close(moved.square().mean(dim=(1, 2, 3)).sqrt(), w * rms, rtol=1e-5, atol=0)
        # the direction: with tau2 = 0 the objective is tau1 f_y - log K, whose gradient is the class's weights
        cos = torch.nn.functional.cosine_similarity(moved.flatten(1).float(), clf.w[y].flatten(1), dim=1)
        assert (cos > 0.999).all()


def test_elucd_needs_classes_a_fitting_classifier_and_valid_beta():
    den, clf = GaussianDenoiser(MUS), classifier()
    four = LinearClassifier(torch.randn(4, 1, 4, 4), torch.randn(4))
    with pytest.raises(ValueError, match="predicts 4 classes but the backbone samples labels of 3"):
        EluCDEDMGuidance(four, softplus_beta=None).check(den)
    wide = LinearClassifier(torch.randn(3, 1, 8, 8), torch.randn(3))
    with pytest.raises(ValueError, match="does not accept the backbone's 1x4x4 samples"):
        EluCDEDMGuidance(wide, softplus_beta=None).check(den)
    with pytest.raises(ValueError, match="needs a classifier"):
        EntropyDrivenGuidance(None, 1.0).check(den)
    den.num_classes = 0
    with pytest.raises(ValueError, match="no label space"):
        EluCDEDMGuidance(clf, softplus_beta=None).check(den)
    with pytest.raises(ValueError, match="softplus_beta"):
        EluCDGuidance(torch.nn.Sequential(torch.nn.ReLU()), softplus_beta=-1.0)
    with pytest.raises(ValueError, match="max_variance"):
        EluCDGuidance(clf, softplus_beta=None, max_variance="batch")


def test_elucd_on_a_latent_backbone_guides_through_the_decoder():
    """DecodedClassifier: the x0 gradient is the classifier's image gradient pulled back through the decoder."""
    from guidebench.classifiers.decoded import DecodedClassifier

    decoder = torch.nn.ConvTranspose2d(4, 1, 2, stride=2, bias=False).requires_grad_(False)  # 4x4x4 latents -> 1x8x8
    torch.nn.init.normal_(decoder.weight, generator=torch.Generator().manual_seed(5))
    image_clf = LinearClassifier(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6)), torch.zeros(3))
    den = GaussianDenoiser(torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7)), shape=(4, 4, 4))
    g = EluCDGuidance(DecodedClassifier(image_clf, decoder), scale=1.5, softplus_beta=None,
                      margin_temperature_discount=0.5)
    g.check(den, sample_ddpm)
    sigmas = torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([0, 2])
    g.begin(den, sigmas, y)
    d = den(x, sigmas[1].expand(2), y)
    variance = torch.full((2, 4, 4, 4), 0.3, dtype=torch.float64)
    shift = g.mean_shift(den, x, sigmas[1].expand(2), sigmas[2].expand(2), y, variance, den=d, step=1)
    jac = torch.autograd.functional.jacobian(lambda z: decoder(z.unsqueeze(0)).flatten(), d.x0[0]).reshape(64, 64)
    f = image_clf(decoder(d.x0), None)
    grad_img = image_clf.w[y].flatten(1) - 0.5 * torch.softmax(0.5 * f, -1) @ image_clf.w.flatten(1)
    grad_z = (grad_img @ jac).reshape(2, 4, 4, 4).double()
    torch.testing.assert_close(shift, 0.3 * 1.5 * grad_z, rtol=1e-5, atol=1e-6)  # last step: a_t = 0, sigma' = 0


def test_build_guidance_wraps_x0_classifiers_of_latent_backbones(compose_cfg):
    from guidebench.classifiers.decoded import DecodedClassifier
    from guidebench.sampling import build_guidance

    decoder = torch.nn.Identity()
    elucd = build_guidance(compose_cfg("sample", ["guidance=elucd", "classifier=digits_clean"]), decoder=decoder)
    assert isinstance(elucd.classifier, DecodedClassifier) and elucd.classifier.decoder is decoder
    eds = build_guidance(compose_cfg("sample", ["guidance=eds"]), decoder=decoder)
    assert not isinstance(eds.classifier, DecodedClassifier)  # noise-aware classifiers see the sampler's state
    assert not isinstance(build_guidance(compose_cfg("sample", ["guidance=elucd", "classifier=digits_clean"])).classifier,
                          DecodedClassifier)
