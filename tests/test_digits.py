"""The digits benchmark: data split, the four training loops, the shipped checkpoints and sampling quality."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from guidebench.backbones.digits import load_denoiser
from guidebench.checkpoints import CheckpointError, sha256_file
from guidebench.classifiers.digits import load_clean_classifier, load_noisy_classifier
from guidebench.cli.train import train
from guidebench.config import CONF_DIR, REPO_ROOT
from guidebench.data.digits import load_digits_split, split_indices
from guidebench.evaluation.digits_evalnet import load_evalnet
from guidebench.samplers import sample_ddim
from guidebench.schedules import sigmas_respaced
from guidebench.training.classifiers import (
    EVAL_TIMESTEPS, noisy_accuracy, noisy_entropy, train_clean_classifier, train_noisy_classifier,
)
from guidebench.training.common import accuracy, random_shift
from guidebench.training.evalnet import evalnet_accuracy

SHIPPED = REPO_ROOT / "checkpoints" / "digits"
TASKS = ("diffusion", "noisy_classifier", "clean_classifier", "evalnet")
LOADERS = {"diffusion": load_denoiser, "noisy_classifier": load_noisy_classifier,
           "clean_classifier": load_clean_classifier, "evalnet": load_evalnet}


def shipped(task: str) -> Path:
    path = SHIPPED / f"{task}.pt"
    if not path.is_file():
        pytest.fail(f"shipped checkpoint {path} is missing; make it with "
                    f"guidebench-train task={task} out=checkpoints/digits/{task}.pt")
    return path


def test_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    train_rows, heldout_rows = split_indices("train"), split_indices("heldout")
    assert (len(train_rows), len(heldout_rows)) == (1297, 500)
    assert not set(train_rows.tolist()) & set(heldout_rows.tolist())
    assert sorted(np.concatenate([train_rows, heldout_rows]).tolist()) == list(range(1797))
    # Pinned: the shipped checkpoints were trained on exactly this split.
    assert train_rows[:5].tolist() == [1081, 1707, 927, 713, 262]
    assert heldout_rows[:5].tolist() == [1768, 1452, 1623, 1356, 1511]
    np.testing.assert_array_equal(split_indices("train"), train_rows)

    raw = load_digits()
    heldout = load_digits_split("heldout")
    v = raw.images[heldout_rows]
    np.testing.assert_array_equal(heldout.labels.numpy(), raw.target[heldout_rows])
    np.testing.assert_allclose(heldout.images[:, 0].numpy(), v / 8 - 1)
    np.testing.assert_array_equal(heldout.images_uint8[..., 0].numpy(), np.round(v * 255 / 16))


def test_random_shift_translates_with_fill():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = random_shift(x, 1, -1.0, torch.Generator().manual_seed(0))
    for img, src in zip(out, x):
        shifted = [torch.nn.functional.pad(src, (1, 1, 1, 1), value=-1.0)[:, dy:dy + 8, dx:dx + 8]
                   for dy in range(3) for dx in range(3)]
        assert any(torch.equal(img, s) for s in shifted)


def _compose(task: str, tmp_path: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("train", overrides=[f"task={task}", f"out={tmp_path / task}.pt", *overrides])


# Loss ratio last/first that brief training must beat: the noisy classifier's loss keeps a floor of
# ~ln(10) on the many steps t whose noise hides the digit.
@pytest.mark.parametrize("task,overrides,ratio", [
    ("diffusion", ["train.steps=100", "train.batch_size=32", "model.channels=16", "model.emb_dim=64"], 0.7),
    ("noisy_classifier", ["train.steps=200", "train.batch_size=32", "model.channels=16", "model.emb_dim=64"], 0.9),
    ("clean_classifier", ["train.steps=150", "train.batch_size=32", "model.channels=16"], 0.5),
    ("evalnet", ["train.steps=150", "train.batch_size=32", "model.channels=16"], 0.5),
])
def test_brief_training_learns(task, overrides, ratio, tmp_path):
    torch.set_num_threads(1)
    result = train(_compose(task, tmp_path, *overrides))
    path = Path(result["checkpoint"])
    assert path == tmp_path / f"{task}.pt" and result["sha256"] == sha256_file(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["task"] == task and ckpt["config"]["model"]["channels"] == 16
    assert result["loss_last"] < ratio * result["loss_first"], result
    model = LOADERS[task](path)   # the saved weights reproduce the recorded numbers
    heldout = load_digits_split("heldout")
    if task == "noisy_classifier":
        acc = result["heldout_accuracy"]
        assert acc[0] > 0.5 and acc[-1] < 0.25, result          # chance is 0.1
        sigma = result["heldout_sigma"][0]
        assert noisy_accuracy(model, heldout.images, heldout.labels, sigma) == pytest.approx(acc[0])
    elif task == "clean_classifier":
        assert result["heldout_accuracy"] > 0.6, result
        assert accuracy(lambda v: model(v, None), heldout.images, heldout.labels) == pytest.approx(
            result["heldout_accuracy"])
    elif task == "evalnet":
        assert result["train_split_accuracy"] > 0.6, result
        assert evalnet_accuracy(model, "train") == pytest.approx(result["train_split_accuracy"])
    else:   # denoises unseen images at sigma = 1 far better than the identity (whose error is sigma^2 = 1)
        x = heldout.images + torch.randn(heldout.images.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            x0 = model(x, torch.ones(len(x)), heldout.labels).x0
        assert (x0 - heldout.images).square().mean() < 0.4


@pytest.mark.parametrize("task,trainer,tiny", [
    ("noisy_classifier", train_noisy_classifier, ["model.channels=4", "model.emb_dim=8"]),
    ("clean_classifier", train_clean_classifier, ["model.channels=4"]),
])
def test_classifier_recipe_reproduces_its_weights(task, trainer, tiny, tmp_path):
    """train.seed seeds the initial weights too: same recipe -> bit-identical state dict, other seed -> not."""
    def weights(global_seed: int, *overrides: str) -> dict[str, torch.Tensor]:
        cfg = _compose(task, tmp_path, "train.steps=3", "train.batch_size=8", *tiny, *overrides)
        torch.manual_seed(global_seed)   # the global RNG's state before training must not matter
        return trainer(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.train))[0].state_dict()

    a, b, c = weights(0), weights(1), weights(0, "train.seed=7")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("task", TASKS)
def test_missing_checkpoint_names_file_and_command(task, tmp_path):
    with pytest.raises(CheckpointError, match=rf"absent\.pt.*guidebench-train task={task} "):
        LOADERS[task](tmp_path / "absent.pt")


def test_wrong_task_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="task=evalnet model, expected task=diffusion"):
        load_denoiser(shipped("evalnet"))
    with pytest.raises(CheckpointError, match="task=diffusion model, expected task=noisy_classifier"):
        load_noisy_classifier(shipped("diffusion"))


def test_readme_lists_shipped_sha256():
    readme = (SHIPPED / "README.md").read_text()
    for task in TASKS:
        assert sha256_file(shipped(task)) in readme, f"README.md lacks the sha256 of {task}.pt"
        assert re.search(rf"guidebench-train task={task}\b.*out=checkpoints/digits/{task}\.pt", readme)


def test_shipped_evalnet_accuracy_on_unseen_train_split():
    ckpt = torch.load(shipped("evalnet"), weights_only=True)
    recorded = ckpt["metrics"]["train_split_accuracy"]
    assert recorded >= 0.95
    assert evalnet_accuracy(load_evalnet(shipped("evalnet")), "train") == pytest.approx(recorded, abs=0.003)


def test_shipped_classifiers_accuracy_on_heldout():
    heldout = load_digits_split("heldout")
    clean = torch.load(shipped("clean_classifier"), weights_only=True)["metrics"]
    net = load_clean_classifier(shipped("clean_classifier"))
    assert clean["heldout_accuracy"] >= 0.95
    assert accuracy(lambda v: net(v, None), heldout.images, heldout.labels) == pytest.approx(
        clean["heldout_accuracy"], abs=0.003)

    noisy = torch.load(shipped("noisy_classifier"), weights_only=True)["metrics"]
    net = load_noisy_classifier(shipped("noisy_classifier"))
    acc = noisy["heldout_accuracy"]
    assert len(acc) == len(EVAL_TIMESTEPS) and acc[0] >= 0.95 and acc[-1] <= 0.2   # chance at sigma_max
    for i in (0, len(acc) // 2, len(acc) - 1):
        sigma = noisy["heldout_sigma"][i]
        assert noisy_accuracy(net, heldout.images, heldout.labels, sigma) == pytest.approx(acc[i], abs=0.003)


def test_shipped_ect_classifier_accuracy_and_entropy():
    """noisy_classifier_ect.pt (ED-DPM ECT, lam 0.1): recorded accuracies, sha256 in the README, less confident."""
    command = ("guidebench-train task=noisy_classifier train.ect_lambda=0.1 "
               "out=checkpoints/digits/noisy_classifier_ect.pt")
    path = SHIPPED / "noisy_classifier_ect.pt"
    if not path.is_file():
        pytest.fail(f"shipped checkpoint {path} is missing; make it with {command}")
    readme = (SHIPPED / "README.md").read_text()
    assert sha256_file(path) in readme and command in readme
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["train"]["ect_lambda"] == 0.1
    heldout = load_digits_split("heldout")
    net, plain = load_noisy_classifier(path), load_noisy_classifier(shipped("noisy_classifier"))
    acc = ckpt["metrics"]["heldout_accuracy"]
    assert len(acc) == len(EVAL_TIMESTEPS) and acc[0] >= 0.95 and acc[-1] <= 0.2
    for i in (0, len(acc) // 2, len(acc) - 1):
        sigma = ckpt["metrics"]["heldout_sigma"][i]
        assert noisy_accuracy(net, heldout.images, heldout.labels, sigma) == pytest.approx(acc[i], abs=0.003)
    for sigma in ckpt["metrics"]["heldout_sigma"][:len(acc) // 2 + 1]:   # both ~ln 10 at the largest sigmas
        assert noisy_entropy(net, heldout.images, sigma) > noisy_entropy(plain, heldout.images, sigma)


def ddim20_accuracy(denoiser, evalnet, labels) -> float:
    """evalnet's agreement with `labels` on DDIM-20 samples from x_T of torch.Generator().manual_seed(0)."""
    sigmas = sigmas_respaced(denoiser, "ddim20")
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        x0 = sample_ddim(denoiser, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, labels, eta=0.0)
    images = ((x0 + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return (evalnet(images)["logits"].argmax(1) == labels).float().mean().item()


def test_shipped_diffusion_samples_the_requested_digits():
    evalnet = load_evalnet(shipped("evalnet"))
    labels = torch.arange(64) % 10
    rates = {}
    for conditional in (True, False):
        rates[conditional] = ddim20_accuracy(load_denoiser(shipped("diffusion"), conditional=conditional), evalnet, labels)
    assert rates[True] > 0.85, rates
    assert rates[False] < 0.35, rates


def test_shipped_autoguidance_guide_is_a_weaker_model_of_the_same_task():
    """diffusion_guide.pt: listed with its command and sha256, smaller, trained shorter, and worse than diffusion.pt."""
    readme = (SHIPPED / "README.md").read_text()
    path = SHIPPED / "diffusion_guide.pt"
    assert sha256_file(path) in readme
    assert "guidebench-train task=diffusion model.channels=16 train.steps=300 out=checkpoints/digits/diffusion_guide.pt" in readme
    main, guide = (torch.load(shipped(t), weights_only=True)["config"] for t in ("diffusion", "diffusion_guide"))
    assert guide["model"]["channels"] < main["model"]["channels"] and guide["train"]["steps"] < main["train"]["steps"]
    evalnet, labels = load_evalnet(shipped("evalnet")), torch.arange(64) % 10
    rates = []
    for name in ("diffusion", "diffusion_guide"):
        denoiser = load_denoiser(shipped(name))
        assert (denoiser.num_classes, denoiser.img_resolution) == (10, 8)
        rates.append(ddim20_accuracy(denoiser, evalnet, labels))
    assert rates[1] < rates[0], rates


@pytest.mark.parametrize("respacing", ["100", "ddim25"])
def test_shipped_diffusion_ddpm_from_t_max(respacing):
    """Ancestral DDPM from t = T (sigma ~ 2e4 on the cosine schedule) needs ADM's x0 clipping to stay sane."""
    from guidebench.rng import StackedRandomGenerator
    from guidebench.samplers import sample_ddpm

    evalnet = load_evalnet(shipped("evalnet"))
    labels = torch.arange(64) % 10
    denoiser = load_denoiser(shipped("diffusion"))
    sigmas = sigmas_respaced(denoiser, respacing)
    rng = StackedRandomGenerator("cpu", range(64))
    with torch.no_grad():
        x0 = sample_ddpm(denoiser, rng.randn([64, 1, 8, 8], torch.float64) * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                         labels, rng=rng)
    assert x0.abs().max() <= 1.0 + 1e-6
    images = ((x0 + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    assert (evalnet(images)["logits"].argmax(1) == labels).float().mean().item() > 0.85


def test_real_digits_export_as_samples(tmp_path):
    from guidebench.data.digits import load_digits_split, save_split_npz
    from guidebench.evaluation.sources import open_source

    path = save_split_npz("train", tmp_path / "train.npz", 1000)
    source, split = open_source(path), load_digits_split("train")
    assert len(source) == 1000 and source.shape == (1, 8, 8)
    assert np.array_equal(np.load(path)["arr_0"], split.images_uint8[:1000].numpy())
    assert np.array_equal(source.labels, split.labels[:1000].numpy())
    with pytest.raises(ValueError, match="has 1297 images; cannot take 2000"):
        save_split_npz("train", tmp_path / "x.npz", 2000)
