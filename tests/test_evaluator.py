"""The evaluator against independent numpy/scipy computations on features taken directly from the network."""

from __future__ import annotations

import json
import shutil
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from scipy.spatial.distance import cdist
from scipy.special import log_softmax, softmax
from torch import nn

from guidebench.checkpoints import CheckpointError
from guidebench.config import CONF_DIR
from guidebench.data.digits import load_digits_split
from guidebench.evaluation import sources
from guidebench.evaluation.digits_evalnet import DigitsEvalNet, load_evalnet
from guidebench.evaluation.evaluator import evaluate
from guidebench.evaluation.sources import NpzSource, SourceError, open_source
from guidebench.shards import ShardError, ShardWriter, export_npz
from guidebench.training.checkpoint import save_checkpoint

SHARD = 101


def make_evalnet(path: Path, seed: int) -> Path:
    """A small DigitsEvalNet with a spread-out random init (untrained nets give near-constant features)."""
    torch.manual_seed(seed)
    model = {"channels": 8, "feature_dim": 32}
    net = DigitsEvalNet(**model)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(m.bias, std=0.1)
    net.head.weight.data *= 3
    return save_checkpoint(path, net, {"task": "evalnet", "model": model, "train": {}}, {})


def write_run(run: Path, images: np.ndarray, labels: np.ndarray, nonfinite: list[int] = ()) -> Path:
    """A run folder of `images` in index order, the global indices `nonfinite` left out as NaN/inf."""
    n = len(images) + len(nonfinite)
    indices = np.setdiff1d(np.arange(n), nonfinite)
    writer = ShardWriter(run, {"backbone": "test", "guidance": "none", "scale": 1.0, "num_samples": n},
                         num_samples=n, shard_size=SHARD).prepare()
    for k, start in enumerate(range(0, n, SHARD)):
        rows = np.flatnonzero((indices >= start) & (indices < start + SHARD))
        dropped = np.array([i for i in nonfinite if start <= i < start + SHARD], dtype=np.int64)
        writer.write(k, images[rows], labels[rows], indices[rows], indices[rows], dropped)
    writer.merge()
    return run


def suite_for(checkpoint: Path) -> dict:
    """The shipped digits suite with this test's checkpoint."""
    suite = OmegaConf.load(CONF_DIR / "metrics" / "digits.yaml")
    suite.extractors.evalnet.checkpoint = str(checkpoint)
    return OmegaConf.to_container(suite, resolve=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """300 samples in 3 shards (and 3 non-finite ones): 200 digits of the train split, 100 uniform-noise images
    (random labels)."""
    tmp = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    train = load_digits_split("train")
    images = np.concatenate([train.images_uint8[:200].numpy(),
                             rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)])
    labels = np.concatenate([train.labels[:200].numpy(), rng.integers(0, 10, 100)])
    ckpt = make_evalnet(tmp / "evalnet.pt", seed=0)
    run = write_run(tmp / "run", images, labels, nonfinite=[117, 150, 299])
    suite = suite_for(ckpt)
    cache = tmp / "cache"
    result = evaluate(run, None, suite, run, cache_dir=cache, device="cpu", verbose=False)
    return SimpleNamespace(tmp=tmp, images=images, labels=labels, ckpt=ckpt, run=run, suite=suite, cache=cache,
                           result=result)


def net_outputs(ckpt: Path, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = load_evalnet(ckpt)(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
    return out["features"].double().numpy(), out["logits"].double().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2 (symmetric PSD)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def coverage(query: np.ndarray, support: np.ndarray, k: int) -> float:
    """Kynkaanniemi et al. 2019: fraction of `query` inside a ball around a support point reaching its k-th NN."""
    radii = np.sort(cdist(support, support), axis=1)[:, k]  # column 0 is the point itself
    return float(np.mean((cdist(query, support) <= radii[None]).any(axis=1)))


def inception_score(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of a seed-shuffled order (torch-fidelity's convention)."""
    n = len(logits)
    logits = logits[np.random.RandomState(seed).permutation(n)]
    scores = []
    for i in range(splits):
        part = logits[i * n // splits:(i + 1) * n // splits]
        p, log_p = softmax(part, axis=1), log_softmax(part, axis=1)
        scores.append(np.exp((p * (log_p - np.log(p.mean(0)))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(f1, f2, subsets: int, size: int, seed: int) -> float:
    """Binkowski et al. 2018: unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets."""
    rng = np.random.RandomState(seed)
    kernel = lambda a, b: (a @ b.T / f1.shape[1] + 1) ** 3  # noqa: E731
    mmds = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), size, replace=False)]
        y = f2[rng.choice(len(f2), size, replace=False)]
        kxx, kyy = kernel(x, x), kernel(y, y)
        mmds.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
                    - 2 * kernel(x, y).mean())
    return float(np.mean(mmds))


def test_metrics_equal_independent_computations(env):
    r, options = env.result, env.suite["extractors"]["evalnet"]["options"]
    heldout = load_digits_split("heldout")
    f_gen, l_gen = net_outputs(env.ckpt, env.images)
    f_ref, _ = net_outputs(env.ckpt, heldout.images_uint8.numpy())

    assert r["fid"] == pytest.approx(frechet_distance(f_gen, f_ref), rel=1e-3)
    assert r["fid"] > 1e-3  # the noise images make the distributions differ
    k = options["prc_neighborhood"]
    assert r["precision"] == pytest.approx(coverage(f_gen, f_ref, k), abs=1e-6)
    assert r["recall"] == pytest.approx(coverage(f_ref, f_gen, k), abs=1e-6)
    assert 0.2 < r["precision"] < 0.95  # noise samples fall outside the digits manifold
    is_mean, is_std = inception_score(l_gen, options["isc_splits"], options["rng_seed"])
    assert r["is"] == pytest.approx(is_mean, rel=1e-6) and r["is_std"] == pytest.approx(is_std, rel=1e-6)
    assert r["kid"] == pytest.approx(kernel_inception_distance(
        f_gen, f_ref, options["kid_subsets"], min(options["kid_subset_size"], 300), options["rng_seed"]), rel=1e-4)
    assert r["accuracy"] == pytest.approx(np.mean(l_gen.argmax(1) == env.labels))
    assert (r["num_samples"], r["num_reference"], r["nonfinite"]) == (300, 500, 3)
    assert json.loads((env.run / "metrics.json").read_text()) == r


def test_reference_is_materialised_and_cached(env, monkeypatch):
    ref = np.load(env.cache / "references" / "digits-heldout.npz")
    heldout = load_digits_split("heldout")
    np.testing.assert_array_equal(ref["arr_0"], heldout.images_uint8.numpy())
    np.testing.assert_array_equal(ref["arr_1"], heldout.labels.numpy())

    reads = []
    original = NpzSource.load_part
    monkeypatch.setattr(NpzSource, "load_part", lambda self, k: reads.append(k) or original(self, k))
    again = evaluate(env.run, None, env.suite, env.tmp / "again", cache_dir=env.cache, device="cpu", verbose=False)
    assert reads == [] and again == {**env.result}  # reference features came from the cache
    other = suite_for(make_evalnet(env.tmp / "other.pt", seed=1))
    rescored = evaluate(env.run, None, other, env.tmp / "other", cache_dir=env.cache, device="cpu", verbose=False)
    assert reads  # new weights: a new cache key, the reference is read again
    f_gen, _ = net_outputs(env.tmp / "other.pt", env.images)
    f_ref, _ = net_outputs(env.tmp / "other.pt", load_digits_split("heldout").images_uint8.numpy())
    assert rescored["fid"] == pytest.approx(frechet_distance(f_gen, f_ref), rel=1e-3)


def test_streaming_holds_one_shard(env, monkeypatch):
    alive_at_read, refs = [], []

    def tracked_read_shard(path):
        alive_at_read.append(sum(r() is not None for r in refs))
        data = sources_read_shard(path)
        refs.append(weakref.ref(data["arr_0"]))
        return data

    sources_read_shard = sources.read_shard
    monkeypatch.setattr(sources, "read_shard", tracked_read_shard)
    result = evaluate(env.run, None, env.suite, env.tmp / "stream", cache_dir=env.cache, device="cpu", verbose=False)
    assert result == {**env.result, "samples": str(env.run)}
    assert max(alive_at_read) == 0  # the previous shard was released before the next was read
    assert len(alive_at_read) == 2 * 3  # two sequential passes (torch-fidelity, accuracy), each shard read once


def test_adm_npz_and_image_folders_give_the_same_numbers(env):
    npz = export_npz(env.run, env.tmp / "samples.npz")
    grey, rgb = env.tmp / "png_grey", env.tmp / "png_rgb"
    grey.mkdir(), rgb.mkdir()
    for i, image in enumerate(env.images):
        Image.fromarray(image[..., 0], mode="L").save(grey / f"{i:06d}.png")
        Image.fromarray(np.repeat(image, 3, axis=2), mode="RGB").save(rgb / f"{i:06d}.png")
    assert open_source(rgb).shape == (3, 8, 8) and open_source(grey).shape == (1, 8, 8)
    keys = ["fid", "is", "is_std", "precision", "recall", "kid"]
    for source, acc in ((npz, env.result["accuracy"]), (grey, None), (rgb, None)):
        r = evaluate(source, None, env.suite, env.tmp / f"out_{source.name}", cache_dir=env.cache, device="cpu", verbose=False)
        assert {k: r[k] for k in keys} == pytest.approx({k: env.result[k] for k in keys}, rel=1e-6), source
        assert r["accuracy"] == acc and r["num_samples"] == 300 and r["nonfinite"] == 0


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_source_reads_rows_in_chunks(tmp_path, compressed):
    images = np.random.default_rng(1).integers(0, 256, (250, 4, 6, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images)
    source = NpzSource(path, chunk=64)
    assert len(source) == 250 and source.labels is None and source.shape == (3, 4, 6)
    for i in [0, 1, 63, 64, 200, 249, 5, 130, 129]:  # forwards, then backwards
        np.testing.assert_array_equal(source[i].numpy(), images[i].transpose(2, 0, 1))


def test_corrupt_shard_names_the_file(env, tmp_path):
    truncated = shutil.copytree(env.run, tmp_path / "truncated")
    shard = truncated / "shards" / "shard-000001.npz"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ShardError, match="shard-000001.npz"):
        open_source(truncated)

    flipped = shutil.copytree(env.run, tmp_path / "flipped")
    shard = flipped / "shards" / "shard-000002.npz"
    data = bytearray(shard.read_bytes())
    data[500:520] = bytes(255 - b for b in data[500:520])  # inside arr_0's pixels: the CRC check fails on read
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000002.npz"):
        evaluate(flipped, None, env.suite, tmp_path / "out", cache_dir=env.cache, device="cpu", verbose=False)


def test_resolution_errors(env, tmp_path):
    big = np.zeros((20, 16, 16, 1), np.uint8)
    run16 = write_run(tmp_path / "run16", big, np.zeros(20, np.int64))
    with pytest.raises(SourceError, match="16x16.*8x8"):
        evaluate(run16, None, env.suite, tmp_path / "out", cache_dir=env.cache, device="cpu", verbose=False)

    mixed = ShardWriter(tmp_path / "mixed", {"backbone": "test"}, num_samples=120, shard_size=100).prepare()
    mixed.write(0, env.images[:100], env.labels[:100], np.arange(100), np.arange(100))
    mixed.write(1, big, np.zeros(20), np.arange(100, 120), np.arange(100, 120))
    mixed.merge()
    with pytest.raises(SourceError, match="shard-000001.npz is 16x16"):
        open_source(mixed.out_dir)

    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(folder / "b.png")
    with pytest.raises(SourceError, match="b.png"):
        open_source(folder)


def test_missing_checkpoint_names_the_config_key(env, tmp_path):
    suite = suite_for(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match=r"metrics\.extractors\.evalnet\.checkpoint.*guidebench-train task=evalnet"):
        evaluate(env.run, None, suite, tmp_path, cache_dir=env.cache, device="cpu", verbose=False)


def test_cli_scores_a_shard_folder(env, tmp_path, monkeypatch):
    from guidebench.cli.evaluate import main

    run = shutil.copytree(env.run, tmp_path / "run", ignore=shutil.ignore_patterns("metrics.json"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "guidebench-evaluate", f"evaluation.samples={run}", f"metrics.extractors.evalnet.checkpoint={env.ckpt}",
        f"evaluation.cache_dir={env.cache}", "evaluation.device=cpu", "evaluation.verbose=false",
        f"hydra.run.dir={tmp_path / 'hydra'}"])
    main()
    written = json.loads((run / "metrics.json").read_text())
    assert written == {**env.result, "samples": str(run)}


def test_trained_evalnet_scores_real_digits(tmp_path):
    """With the shipped checkpoint: real digits are classified well and sit closer to the reference than noise."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=["evaluation.samples=unused"])
    suite = OmegaConf.to_container(cfg.metrics, resolve=True)
    assert suite["extractors"]["evalnet"]["checkpoint"] == str(CONF_DIR.parent / "checkpoints/digits/evalnet.pt")
    if not Path(suite["extractors"]["evalnet"]["checkpoint"]).is_file():
        pytest.skip(f"no trained evaluation network at {suite['extractors']['evalnet']['checkpoint']}")
    train = load_digits_split("train")
    real = write_run(tmp_path / "real", train.images_uint8[:500].numpy(), train.labels[:500].numpy())
    noise = write_run(tmp_path / "noise", np.random.default_rng(0).integers(0, 256, (500, 8, 8, 1), dtype=np.uint8),
                      train.labels[:500].numpy())
    scored = {run.name: evaluate(run, None, suite, run, cache_dir=tmp_path / "cache", device="cpu", verbose=False)
              for run in (real, noise)}
    assert scored["real"]["accuracy"] > 0.9
    assert scored["real"]["fid"] < scored["noise"]["fid"] / 10
    assert min(scored["real"]["precision"], scored["real"]["recall"]) > 0.7 > 0.3 > scored["noise"]["recall"]
