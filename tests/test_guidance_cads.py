"""CADS (Sadat et al. 2024) against the annealing written out on a Gaussian whose class means are an embedding."""

import pytest
import torch

from guidebench.guidance import CADS, ClassifierFreeGuidance
from guidebench.guidance.cads import class_embedding
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim
from tests.analytic import MUS, GaussianDenoiser, batch


class EmbeddedGaussian(GaussianDenoiser):
    """The exact Gaussian denoiser with mu_y read from a class embedding `label_emb` (null row = 0), as ADM adds it."""

    def __init__(self, mus):
        super().__init__(mus)
        self.label_emb = torch.nn.Embedding(len(mus) + 1, mus[0].numel())
        with torch.no_grad():
            self.label_emb.weight.copy_(torch.cat([mus.flatten(1), torch.zeros(1, mus[0].numel())]))

    def mu(self, labels):
        return self.label_emb(labels).reshape(len(labels), *self.mus.shape[1:])


def schedule(n):
    return torch.linspace(5, 0, n + 1, dtype=torch.float64)


def gamma_by_hand(t, tau1, tau2):
    return 1.0 if t <= tau1 else 0.0 if t >= tau2 else (tau2 - t) / (tau2 - tau1)


def test_gamma_is_the_piecewise_linear_schedule_of_eq_4():
    g = CADS(3.0, tau1=0.4, tau2=0.8)
    n = 10
    g.begin(EmbeddedGaussian(MUS), schedule(n), None)
    gammas = [g.gamma(i) for i in range(n)]
    assert gammas == pytest.approx([gamma_by_hand(1 - i / n, 0.4, 0.8) for i in range(n)])
    assert gammas[0] == 0 and gammas[-1] == 1 and all(a <= b for a, b in zip(gammas, gammas[1:]))


@pytest.mark.parametrize("psi", [0.0, 1.0, 0.5])
def test_conditional_embedding_is_annealed_and_the_null_branch_is_not(psi):
    den = EmbeddedGaussian(MUS)
    x, sigma, y = batch(3)
    seeds, n, step, s, w = [4, 5, 6], 10, 2, 0.3, 3.0
    g = CADS(w, tau1=0.5, tau2=0.9, noise_scale=s, psi=psi)
    g.begin(den, schedule(n), y, rng=StackedRandomGenerator("cpu", seeds))
    ours = g(den, x, sigma, y, step=step).x0

    gamma = gamma_by_hand(1 - step / n, 0.5, 0.9)
    assert 0 < gamma < 1
    noise = StackedRandomGenerator("cpu", seeds).randn([3, MUS[0].numel()])
    e = MUS[y].flatten(1)
    e_hat = gamma**0.5 * e + s * (1 - gamma) ** 0.5 * noise
    e_rescaled = (e_hat - e_hat.mean(1, keepdim=True)) / e_hat.std(1, keepdim=True) * e.std(1, keepdim=True) \
        + e.mean(1, keepdim=True)
    mu_c = (psi * e_rescaled + (1 - psi) * e_hat).reshape(x.shape)
    k = (den.s**2 / (den.s**2 + sigma**2)).reshape(-1, 1, 1, 1).float()
    cond, uncond = mu_c + k * (x - mu_c), k * x  # the null class mean is 0
    torch.testing.assert_close(ours, uncond + w * (cond - uncond))


def test_clean_steps_are_cfg_and_draw_no_noise():
    den = EmbeddedGaussian(MUS)
    x, sigma, y = batch(2)
    rng = StackedRandomGenerator("cpu", [0, 1])
    g = CADS(2.0)
    g.begin(den, schedule(10), y, rng=rng)
    assert g.gamma(9) == 1
    torch.testing.assert_close(g(den, x, sigma, y, step=9).x0, ClassifierFreeGuidance(2.0)(den, x, sigma, y).x0)
    torch.testing.assert_close(rng.randn([2, 3]), StackedRandomGenerator("cpu", [0, 1]).randn([2, 3]))


def test_scale_one_anneals_the_conditional_model_alone():
    den = EmbeddedGaussian(MUS)
    x, sigma, y = batch(2)
    g = CADS(1.0, noise_scale=1.0)
    g.begin(den, schedule(4), y, rng=StackedRandomGenerator("cpu", [0, 1]))
    den.calls.clear()
    out = g(den, x, sigma, y, step=0).x0  # gamma = 0: the class is pure noise, one forward of the B rows
    assert den.calls == [2] and not torch.allclose(out, den(x, sigma, y).x0)


def test_a_sample_does_not_depend_on_its_batch():
    den = EmbeddedGaussian(MUS)
    x, _, y = batch(3)
    sigmas = schedule(8)

    def run(rows, seeds):
        g = CADS(3.0, noise_scale=0.5)
        return sample_ddim(den, x[rows] * 5, sigmas, y[rows], guidance=g, rng=StackedRandomGenerator("cpu", seeds))

    torch.testing.assert_close(run([0, 1, 2], [7, 8, 9])[2:], run([2], [9]))


def test_refuses_a_backbone_without_a_class_embedding():
    with pytest.raises(ValueError, match="has none"):
        CADS(2.0).check(GaussianDenoiser(MUS))
    with pytest.raises(ValueError, match="tau1 < tau2"):
        CADS(2.0, tau1=0.9, tau2=0.5)


def test_finds_the_class_embedding_of_every_backbone():
    from guidebench.backbones.adm import UNetModel
    from guidebench.backbones.digits import DigitsUNet
    from guidebench.backbones.dit import DiT
    from guidebench.backbones.edm import DhariwalUNet

    adm = UNetModel(model_channels=32, out_channels=3, num_res_blocks=1, attention_ds=(), channel_mult=(1,),
                    num_classes=5)
    dit = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=5)
    edm = DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=5, model_channels=32,
                       channel_mult=[1], num_blocks=1, attn_resolutions=[], channel_mult_emb=1)
    digits = DigitsUNet(channels=8, channel_mult=1, num_res_blocks=1, emb_dim=16, num_classes=10)
    for net, expected in [(adm, adm.label_emb), (dit, dit.y_embedder.embedding_table), (edm, edm.map_label),
                          (digits, digits.label_embed)]:
        net.num_classes = 5
        assert class_embedding(net) is expected
