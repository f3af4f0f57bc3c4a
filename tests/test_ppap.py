"""PPAP on digits: routing per sample, the distillation loss written out, errors for bad input, and the
recipe end to end (guidebench-sample -> guidebench-train task=ppap_experts -> guidebench-run guidance=ppap)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import hydra
import pytest
import torch

from guidebench.checkpoints import CheckpointError
from guidebench.classifiers.digits import CleanDigitsClassifier
from guidebench.classifiers.lora import LoRAConv2d, add_lora_adapters
from guidebench.cli.run import run
from guidebench.cli.train import train
from guidebench.config import REPO_ROOT
from guidebench.denoisers.discrete_vp import betas_for_schedule
from guidebench.guidance.ppap import PPAPExperts, PPAPGuidance, load_experts
from guidebench.sampling import sample
from guidebench.training.ppap import distillation_loss, train_ppap_experts

SHIPPED = REPO_ROOT / "checkpoints" / "digits" / "ppap_experts.pt"
CLEAN = REPO_ROOT / "checkpoints" / "digits" / "clean_classifier.pt"


def tiny_experts(n=3, image_size=8, num_classes=10, **kw) -> PPAPExperts:
    torch.manual_seed(0)
    nets = []
    for _ in range(n):
        net = add_lora_adapters(CleanDigitsClassifier(channels=4, num_classes=num_classes), 2, 1.0)
        for p in net.parameters():  # non-zero B: each expert is a different function
            p.data.normal_(0, 0.3)
        nets.append(net.eval())
    return PPAPExperts(nets, betas_for_schedule("cosine", 1000), image_size=image_size, num_classes=num_classes, **kw)


def schedule_sigmas(name: str) -> torch.Tensor:
    abar = torch.cumprod(1 - betas_for_schedule(name, 1000), 0)
    return ((1 - abar) / abar).sqrt()


def digits_like(num_classes=10, resolution=8, schedule="cosine"):
    """What PPAPGuidance.check reads of a backbone: image shape, label space, training sigmas."""
    return SimpleNamespace(img_channels=1, img_resolution=resolution, num_classes=num_classes,
                           sigmas=schedule_sigmas(schedule))


def test_lora_on_the_clean_digits_cnn_starts_as_the_cnn_and_trains_adapters_and_batchnorm():
    torch.manual_seed(0)
    base = CleanDigitsClassifier(channels=8).eval()
    adapted = add_lora_adapters(copy.deepcopy(base), r=4, lora_alpha=2)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(adapted(x), base(x), atol=0, rtol=0)  # B = 0
    assert sum(isinstance(m, LoRAConv2d) for m in adapted.modules()) == 4
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    batchnorms = {f"features.{i}.{w}" for i, m in enumerate(base.features) if isinstance(m, torch.nn.BatchNorm2d)
                  for w in ("weight", "bias")}
    assert trainable == {n for n, _ in adapted.named_parameters() if "lora_" in n} | batchnorms
    assert not any("head" in n or n.endswith("conv.weight") for n in trainable)


def test_per_sample_routing_makes_each_sample_independent_of_its_batch():
    """A batch at mixed noise levels: per_sample = each sample through its own expert alone; first_in_batch (the
    original) = the whole batch through sample 0's expert."""
    experts = tiny_experts(3)
    sigma = experts.sigmas[torch.tensor([10, 500, 999, 333])]  # experts 0, 1, 2, 0 (bounds 0, 333, 666, 1000)
    assert experts.route(sigma).tolist() == [0, 1, 2, 1]  # step 333 is expert 1's (boundary='upper')
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        together = experts(x, sigma)
        alone = torch.cat([experts(x[i:i + 1], sigma[i:i + 1]) for i in range(4)])
        x_t = x / (1 + sigma.float() ** 2).sqrt().reshape(-1, 1, 1, 1)
        by_hand = torch.cat([experts.experts[k](x_t[i:i + 1]) for i, k in enumerate([0, 1, 2, 1])])
        first = copy.deepcopy(experts)
        first.routing = "first_in_batch"
        original = first(x, sigma)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(together, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(original, experts.experts[0](x_t), atol=1e-6, rtol=0)
    lower = copy.deepcopy(experts)
    lower.boundary = "lower"
    assert lower.route(sigma).tolist() == [0, 1, 2, 0]


def test_distillation_loss_is_forward_kl_with_temperature_on_the_teacher_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    p = torch.softmax(teacher / 0.25, dim=1)
    expected = (p * (p.log() - torch.log_softmax(student, dim=1))).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, 0.25).mean(-1).mean(), expected)


def test_bad_switches_and_expert_counts_are_refused():
    with pytest.raises(ValueError, match="boundary must be one of"):
        tiny_experts(2, boundary="inclusive")
    with pytest.raises(ValueError, match="routing must be one of"):
        tiny_experts(2, routing="batch")
    model = dict(base={"_target_": "guidebench.classifiers.digits.load_clean_classifier", "checkpoint": str(CLEAN)},
                 n_experts=3, r=2, lora_alpha=1, linear_forward="scaled", num_timesteps=1000, noise_schedule="cosine",
                 image_size=8, num_classes=10)
    with pytest.raises(ValueError, match=r"train.steps=10 does not divide into model.n_experts=3.*multiple of 3"):
        train_ppap_experts(model, dict(steps=10, samples="unused", seed=0))
    with pytest.raises(ValueError, match="n_experts=2000 does not fit 1000 diffusion steps"):
        train_ppap_experts({**model, "n_experts": 2000}, dict(steps=2000, samples="unused", seed=0))


@pytest.mark.parametrize("num_classes, resolution", [(10, 16), (3, 8)], ids=["resolution", "classes"])
def test_experts_for_another_resolution_or_class_count_are_refused_with_the_train_command(num_classes, resolution):
    guidance = PPAPGuidance(tiny_experts(2, image_size=8, num_classes=10))
    with pytest.raises(ValueError, match=r"distilled for 10 classes at 8x8.*guidebench-train task=ppap_experts"):
        guidance.check(digits_like(num_classes, resolution))


def test_experts_of_another_schedule_and_plain_classifiers_are_refused():
    with pytest.raises(ValueError, match="another 1000-step schedule.*guidebench-train task=ppap_experts"):
        PPAPGuidance(tiny_experts(2)).check(digits_like(schedule="linear"))
    with pytest.raises(ValueError, match="needs PPAP's expert classifiers.*classifier=digits_ppap"):
        PPAPGuidance(CleanDigitsClassifier()).check(digits_like())


def test_missing_or_foreign_expert_files_name_the_train_command(compose_cfg, tmp_path):
    cfg = compose_cfg("sample", ["guidance=ppap", "classifier=digits_ppap",
                                 f"classifier.checkpoint={tmp_path / 'nope.pt'}"])
    with pytest.raises(Exception, match=r"missing file .*nope.pt.*guidebench-train task=ppap_experts"):
        hydra.utils.instantiate(cfg.classifier)
    base = hydra.utils.instantiate(cfg.classifier.base)
    with pytest.raises(CheckpointError, match="not a task=ppap_experts checkpoint.*guidebench-train task=ppap_experts"):
        load_experts(CLEAN, base)


@pytest.mark.skipif(not SHIPPED.exists(), reason="checkpoints/digits/ppap_experts.pt not shipped yet")
def test_shipped_experts_load_and_refuse_another_count(compose_cfg):
    cfg = compose_cfg("sample", ["guidance=ppap", "classifier=digits_ppap"])
    experts = hydra.utils.instantiate(cfg.classifier)
    assert isinstance(experts, PPAPExperts) and len(experts.experts) == cfg.classifier.n_experts
    with pytest.raises(CheckpointError, match=r"holds 5 experts but classifier.n_experts=4.*model.n_experts=4"):
        load_experts(SHIPPED, hydra.utils.instantiate(cfg.classifier.base), n_experts=4)


@pytest.mark.skipif(not SHIPPED.exists(), reason="checkpoints/digits/ppap_experts.pt not shipped yet")
def test_run_with_the_shipped_experts_lifts_the_unconditional_models_accuracy(compose_cfg, tmp_path):
    """guidebench-run backbone=digits_uncond guidance=ppap classifier=digits_ppap: unguided ~0.10 (README table)."""
    metrics = run(compose_cfg("run", ["backbone=digits_uncond", "guidance=ppap", "classifier=digits_ppap",
                                      "sampler.schedule.respacing=ddim25", "sampling.num_samples=64",
                                      f"sampling.out_dir={tmp_path / 'run'}",
                                      f"evaluation.cache_dir={tmp_path / 'c'}"]))
    row = (tmp_path / "run" / "summary.csv").read_text().splitlines()
    assert metrics["num_samples"] == 64 and metrics["accuracy"] > 0.5
    assert ",ppap,digits_ppap,ddim,7.5,64," in row[1]


@pytest.mark.slow
def test_recipe_sample_train_then_guide_lifts_the_unconditional_models_accuracy(compose_cfg, tmp_path):
    """The documented command pair at toy size, then guidebench-run guidance=ppap with the new experts."""
    samples = tmp_path / "samples"
    sample(compose_cfg("sample", ["backbone=digits_uncond", "sampler.schedule.respacing=ddim5",
                                  "sampling.num_samples=128", f"sampling.out_dir={samples}"]))
    out = tmp_path / "experts.pt"
    result = train(compose_cfg("train", ["task=ppap_experts", f"train.samples={samples}", "train.steps=250",
                                         "train.batch_size=64", "train.heldout=null", f"out={out}"]))
    assert result["checkpoint"] == str(out) and len(result["loss_last_per_expert"]) == 5
    run_dir = tmp_path / "run"
    metrics = run(compose_cfg("run", ["backbone=digits_uncond", "guidance=ppap", "classifier=digits_ppap",
                                      f"classifier.checkpoint={out}", "sampler.schedule.respacing=ddim25",
                                      "sampling.num_samples=100", f"sampling.out_dir={run_dir}",
                                      f"evaluation.cache_dir={tmp_path / 'cache'}"]))
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["fingerprint"]["guidance"] == "ppap" and manifest["fingerprint"]["scale"] == 7.5
    assert metrics["num_samples"] == 100 and metrics["accuracy"] > 0.3  # unguided: ~0.1 (README table)


@pytest.mark.slow
def test_imagenet_experiment_runs_at_smoke_size_with_random_weights(compose_cfg, tmp_path):
    """experiment=ppap_adm256_resnet50 with released-size random weights: ADM-U 256, torchvision ResNet-50 and an
    expert file in PPAP's own format (full state dict, keys resnet.*), 2 DDIM steps, 2 samples."""
    import torchvision
    from omegaconf import OmegaConf

    from guidebench.backbones.adm import create_unet
    from guidebench.classifiers.torchvision_resnet import TorchvisionClassifier
    from guidebench.shards import list_shards, read_shard

    cfg = compose_cfg("run", ["experiment=ppap_adm256_resnet50"])
    flags = {k: v for k, v in OmegaConf.to_container(cfg.backbone.denoiser).items()
             if k not in ("_target_", "checkpoint", "dtype", "clip_x0", "sha256")}
    torch.save(create_unet(flags).state_dict(), tmp_path / "uncond.pt")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    expert = add_lora_adapters(TorchvisionClassifier(torchvision.models.resnet50()), 16, 8)
    torch.save({"resnet." + k.removeprefix("net."): v for k, v in expert.state_dict().items()}, tmp_path / "e.ckpt")
    cfg = compose_cfg("run", ["experiment=ppap_adm256_resnet50",
                              f"backbone.denoiser.checkpoint={tmp_path / 'uncond.pt'}", "backbone.denoiser.dtype=float32",
                              f"classifier.base.checkpoint={tmp_path / 'resnet50.pth'}",
                              f"classifier.checkpoints=[{','.join([str(tmp_path / 'e.ckpt')] * 5)}]",
                              "sampler.schedule.respacing=ddim2", "sampling.num_samples=2", "sampling.batch_size=2",
                              "sampling.device=cpu", f"sampling.out_dir={tmp_path / 'run'}"])
    sample(cfg)
    (shard,) = [read_shard(p) for p in list_shards(tmp_path / "run")]
    assert shard["arr_0"].shape == (2, 256, 256, 3)
