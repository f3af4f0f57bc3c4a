"""EDICT as a sampler and DOODL around it, on the shipped digits models: errors up front, exact inversion, the
gradient by inversion against autograd through the stored chain, per-sample seeds, NFE, and a CLI run."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from guidebench.backbones.digits import load_denoiser
from guidebench.classifiers.digits import load_clean_classifier
from guidebench.config import CONF_DIR
from guidebench.generate import generate
from guidebench.guidance.doodl import DOODLGuidance
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import edict_chain, edict_vjp, invert_edict, sample_ddim, sample_edict
from guidebench.sampling import build_guidance, sample
from guidebench.schedules import sigmas_respaced
from tests.test_cli import cli

CHECKPOINTS = CONF_DIR.parent / "checkpoints" / "digits"


@pytest.fixture(scope="module")
def denoiser():
    torch.set_num_threads(1)
    return load_denoiser(CHECKPOINTS / "diffusion.pt")


@pytest.fixture(scope="module")
def classifier():
    return load_clean_classifier(CHECKPOINTS / "clean_classifier.pt")


def start(denoiser, sigmas, n=3, seed=0):
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z * (1 + sigmas[0] ** 2).sqrt(), torch.arange(n)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_doodl_refuses_a_sampler_it_cannot_invert_before_sampling(compose_cfg, tmp_path, sampler):
    cfg = compose_cfg("sample", ["guidance=doodl", "classifier=digits_clean", f"sampler={sampler}",
                                 "sampling.num_samples=4", f"sampling.out_dir={tmp_path / 's'}"])
    with pytest.raises(ValueError, match="use sampler=edict"):
        sample(cfg)
    assert not (tmp_path / "s").exists()


def test_doodl_needs_a_classifier_and_labels(compose_cfg, denoiser, classifier):
    cfg = compose_cfg("sample", ["guidance=doodl", "~classifier", "sampler=edict"])
    with pytest.raises(ValueError, match="classifier=NAME"):
        build_guidance(cfg)
    solver = lambda *a, **k: None  # noqa: E731
    solver.invertible = True
    with pytest.raises(ValueError, match="classifier"):
        DOODLGuidance(None).check(denoiser, solver)
    unconditional = type("Uncond", (), {"img_channels": 1, "img_resolution": 8, "num_classes": 0})()
    with pytest.raises(ValueError, match="no label space"):
        DOODLGuidance(classifier).check(unconditional, solver)
    with pytest.raises(ValueError, match="num_iterations"):
        DOODLGuidance(classifier, num_iterations=-1)


def test_edict_inverts_to_the_start_and_samples_like_ddim(denoiser):
    sigmas = sigmas_respaced(denoiser, "ddim50")
    x, labels = start(denoiser, sigmas, n=4)
    with torch.no_grad():
        final = edict_chain(denoiser, x, x, sigmas, labels)
        back = invert_edict(denoiser, *final, sigmas, labels)
        assert torch.equal(sample_edict(denoiser, x, sigmas, labels), final[0])
        ddim = sample_ddim(denoiser, x, sigmas, labels)
    z = x / (1 + sigmas[0] ** 2).sqrt()
    for b in back:
        assert (b / (1 + sigmas[0] ** 2).sqrt() - z).abs().max() < 1e-6
    assert (final[0] - ddim).abs().mean() < 0.1  # EDICT at 50 steps is DDIM up to its coupling (x in [-1, 1])


def test_gradient_by_inversion_is_autograd_through_the_stored_chain(denoiser):
    """edict_vjp (inversion, one step's graph at a time) against plain autograd through every step, on the model
    without its x0 clamp (a clamp kink makes both exact but finite differences meaningless)."""
    net = load_denoiser(CHECKPOINTS / "diffusion.pt", clip_x0=False)
    sigmas = sigmas_respaced(net, "ddim10")
    x, labels = start(net, sigmas)
    g = torch.Generator().manual_seed(1)
    grad_x, grad_y = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.enable_grad():
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fx, fy = edict_chain(net, a, b, sigmas, labels)
        auto = torch.autograd.grad((fx * grad_x).sum() + (fy * grad_y).sum(), [a, b])
    with torch.no_grad():
        (sx, sy), ours = edict_vjp(net, fx.detach(), fy.detach(), grad_x, grad_y, sigmas, labels)
    for o, r in zip(ours, auto):
        torch.testing.assert_close(o, r, atol=1e-6 * float(r.abs().max()), rtol=1e-5)
    assert (sx - x).abs().max() < 1e-5 and (sy - x).abs().max() < 1e-5
    d = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        plus, minus = (edict_chain(net, x + h * d, x, sigmas, labels) for h in (1e-3, -1e-3))
    fd = sum(((p - m) * gr).sum() for p, m, gr in zip(plus, minus, (grad_x, grad_y))) / 2e-3
    assert float(fd) == pytest.approx(float((ours[0] * d).sum()), rel=5e-3)


def run_generate(denoiser, classifier, sigmas, seeds, **kwargs):
    guidance = DOODLGuidance(classifier, **kwargs)
    return generate(denoiser, sample_edict, sigmas, seeds, num_classes=10, guidance=guidance)


def test_zero_iterations_is_edict_and_nfe_counts_every_forward_and_backward(denoiser, classifier):
    sigmas = sigmas_respaced(denoiser, "ddim5")
    n = len(sigmas) - 1
    plain = generate(denoiser, sample_edict, sigmas, [0, 1], num_classes=10)
    none = run_generate(denoiser, classifier, sigmas, [0, 1], num_iterations=0)
    assert (none["images"] == plain["images"]).all() and plain["nfe"] == 2 * n == none["nfe"]
    out = run_generate(denoiser, classifier, sigmas, [0, 1], num_iterations=3)
    assert out["nfe"] == 3 * 6 * n + 2 * n  # chain 2N, inversion with backward 2 x 2N, per iteration; render 2N
    assert out["classifier_nfe"] == 3 * 2  # both EDICT images, one forward and backward each


def test_each_sample_depends_on_its_seed_only(denoiser, classifier):
    sigmas = sigmas_respaced(denoiser, "ddim5")
    batch = run_generate(denoiser, classifier, sigmas, [4, 5, 6], num_iterations=2)
    alone = run_generate(denoiser, classifier, sigmas, [5], num_iterations=2)
    assert (batch["labels"][1] == alone["labels"][0]).all()
    assert abs(batch["images"][1].astype(int) - alone["images"][0].astype(int)).max() <= 1


def test_iterations_lower_the_loss_and_keep_the_norm(denoiser, classifier):
    sigmas = sigmas_respaced(denoiser, "ddim10")
    x, labels = start(denoiser, sigmas, n=4, seed=3)
    scale = (1 + sigmas[0] ** 2).sqrt()
    method = DOODLGuidance(classifier, num_iterations=3)
    records = []
    z = method.optimise(denoiser, x / scale, sigmas, labels, StackedRandomGenerator("cpu", range(4)),
                        callback=records.append)
    torch.testing.assert_close(z.flatten(1).norm(dim=1), (x / scale).flatten(1).norm(dim=1))
    with torch.no_grad():
        final = edict_chain(denoiser, z * scale, z * scale, sigmas, labels)
        after = method.loss(torch.cat(final), torch.cat([labels, labels])).reshape(2, -1)
    first = records[0]["loss"]
    assert after.mean() < first.mean()
    direction = records[0]["direction"]
    assert torch.equal(direction, -(records[0]["grad"][0] + records[0]["grad"][1]) / 4)


@pytest.mark.slow
def test_cli_run_on_digits(tmp_path):
    run = tmp_path / "run"
    cli("guidebench-run", "backbone=digits", "guidance=doodl", "classifier=digits_clean", "sampler=edict",
        "sampler.schedule.respacing=ddim5", "guidance.num_iterations=2", "sampling.num_samples=16",
        f"hydra.run.dir={run}", f"evaluation.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["accuracy"] > 0.5
    (row,) = csv.DictReader((run / "summary.csv").read_text().splitlines())
    assert row["guidance"] == "doodl" and row["sampler"] == "edict" and row["classifier"] == "digits_clean"
    assert float(row["nfe"]) == 2 * 6 * 5 + 2 * 5 and float(row["classifier_nfe"]) == 4


@pytest.mark.slow
def test_dit_experiment_samples_at_smoke_size(compose_cfg, tmp_path):
    """experiment=doodl_dit_xl_2_256 with random released-size weights (DiT-XL/2, sd-vae-ft-ema's architecture,
    torchvision ResNet-50) through the sampling stage: 2 EDICT steps, 1 iteration, 2 samples; the loss sees the
    VAE-decoded image. (About 7 minutes on 2 loaded CPU cores; scoring needs > 3 samples: test_smoke_full_size.)"""
    import torchvision
    from diffusers import AutoencoderKL

    from guidebench.backbones.dit import DiT, architecture
    from guidebench.shards import list_shards, read_shard

    torch.save(DiT(**architecture("DiT-XL/2", 256)).state_dict(), tmp_path / "dit.pt")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(tmp_path / "vae")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    out = tmp_path / "samples"
    cfg = compose_cfg("sample", ["experiment=doodl_dit_xl_2_256", f"backbone.denoiser.checkpoint={tmp_path / 'dit.pt'}",
                                 f"backbone.decoder.path={tmp_path / 'vae'}",
                                 f"classifier.checkpoint={tmp_path / 'resnet50.pth'}",
                                 "sampler.schedule.respacing=ddim2", "guidance.num_iterations=1",
                                 "sampling.num_samples=2", "sampling.batch_size=2", "sampling.device=cpu",
                                 f"sampling.out_dir={out}"])
    sample(cfg)
    (shard,) = [read_shard(p) for p in list_shards(out)]
    assert shard["arr_0"].shape == (2, 256, 256, 3)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["nfe"] == 6 * 2 + 2 * 2 and manifest["classifier_nfe"] == 2
