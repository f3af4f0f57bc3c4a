"""metrics=pytorch_fid against the real pytorch-fid package (0.3.0) on the ADM suite's Inception weights.

pytorch-fid's own network is built without its download: `pytorch_fid.inception.load_state_dict_from_url`
returns the converted fid-helper weights, loaded strictly into its `fid_inception_v3()`.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from guidebench.checkpoints import CheckpointError
from guidebench.evaluation import inception as inc
from guidebench.evaluation import pytorch_fid as pf

pytorch_fid = pytest.importorskip("pytorch_fid", reason="pytorch-fid (the dev extra) checks the suite independently")
from pytorch_fid import fid_score  # noqa: E402
from pytorch_fid import inception as pf_inception  # noqa: E402

FEATURE_ATOL = 1e-4


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The cache test_inception.py uses too: the network is converted once per session."""
    return tmp_path_factory.getbasetemp() / "guidebench-cache"


@pytest.fixture(scope="module")
def weights(cache):
    try:
        return inc.converted_weights(cache=cache)
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def theirs(weights):
    """pytorch-fid's InceptionV3 (blocks -> {64, 2048}-d features) on the converted weights."""
    state = pf.pytorch_fid_state_dict(torch.load(weights, map_location="cpu"))
    nets = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pf_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
        for dims in (64, 2048):
            block = pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
            nets[dims] = pf_inception.InceptionV3([block], resize_input=True, normalize_input=True,
                                                  use_fid_inception=True).eval()

    @torch.no_grad()
    def features(images: torch.Tensor, dims: int = 2048) -> np.ndarray:
        # fid_score.get_activations: ToTensor ([0, 1]) -> model -> spatial mean if not 1x1 -> float64
        out = nets[dims](images.float() / 255)[0]
        if out.shape[2:] != (1, 1):
            out = torch.nn.functional.adaptive_avg_pool2d(out, output_size=(1, 1))
        return out.squeeze(3).squeeze(2).numpy().astype(np.float64)

    return features


@pytest.fixture(scope="module")
def ours(cache, weights):
    return pf.load_pytorch_fid_inception(cache=cache)


@pytest.fixture(scope="module")
def adm(cache, weights):
    return inc.load_inception(cache=cache)


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 [n, 3, size, size]: smooth colour fields plus noise, so the resize has structure to act on."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=size, mode="bilinear")
    return (base * 255 + torch.rand(n, 3, size, size, generator=g) * 60 - 30).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def images():
    """Few images: every one costs a full 299x299 InceptionV3 forward on the CPU (~0.5 s on 2 shared cores)."""
    return {64: smooth_images(3, 64, 1), 128: smooth_images(2, 128, 2), 299: smooth_images(2, 299, 3)}


@pytest.fixture(scope="module")
def our_pool(ours, images):
    return {size: ours(x)["pool"].double().numpy() for size, x in images.items()}


def test_state_dict_fits_pytorch_fid_strictly(weights):
    model = pf_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    state = pf.pytorch_fid_state_dict(torch.load(weights, map_location="cpu"))
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("size", [64, 128])
def test_pool3_features_equal_pytorch_fids(theirs, images, our_pool, size):
    reference = theirs(images[size])
    assert our_pool[size].shape == reference.shape == (len(images[size]), 2048)
    np.testing.assert_allclose(our_pool[size], reference, rtol=0, atol=FEATURE_ATOL)


def _gaussian_stats(d: int, n: int, seed: int, shift: float = 0.0):
    x = np.random.RandomState(seed).randn(n, d) @ np.random.RandomState(seed + 1).randn(d, d) / np.sqrt(d) + shift
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("d, n", [(128, 400), (64, 20)])  # full rank; singular covariances (n < d)
def test_frechet_distance_equals_pytorch_fids(d, n):
    (mu1, s1), (mu2, s2) = _gaussian_stats(d, n, 0), _gaussian_stats(d, n, 5, shift=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's singular-matrix and disp deprecation warnings
        expected = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
        got = pf.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(float(expected), rel=1e-9, abs=1e-9)
    assert got > 0.1


def test_frechet_distance_imaginary_check():
    """A product with a strongly complex square root fails as pytorch-fid fails."""
    mu = np.zeros(2)
    s1, s2 = np.array([[1.0, 0.0], [0.0, -1.0]]), np.eye(2)  # sqrtm of diag(1, -1) is diag(1, i)
    with pytest.raises(ValueError, match="Imaginary component"):
        fid_score.calculate_frechet_distance(mu, s1, mu, s2)
    with pytest.raises(ValueError, match="Imaginary component"):
        pf.frechet_distance(mu, s1, mu, s2)


def test_differs_from_the_adm_suite_only_by_preprocessing(ours, adm, images, our_pool):
    """Same network: fed the TF graph's input (TF1 resize, (x - 128) / 128) it gives the ADM suite's features.
    At 64x64 the two resizes make the features differ measurably; at 299x299 both resizes are the identity
    and only the normalisation (2u / 255 - 1 vs (u - 128) / 128) is left."""
    scale = np.abs(our_pool[64]).mean()
    adm64 = adm(images[64])["pool"].double().numpy()
    assert np.abs(our_pool[64] - adm64).mean() > 0.05 * scale  # the resize: several % of the feature scale

    x299 = images[299]
    assert torch.equal(torch.nn.functional.interpolate(x299.float() / 255, size=(299, 299), mode="bilinear",
                                                       align_corners=False), x299.float() / 255)
    adm299 = adm(x299)["pool"].double().numpy()
    np.testing.assert_allclose(ours.forward_input(pf.tf_input(x299[:1])).double().numpy(), adm299[:1],
                               rtol=0, atol=FEATURE_ATOL)
    gap299 = np.abs(our_pool[299] - adm299).mean()
    assert gap299 < 0.01 * scale  # normalisation only: far below the resize's effect
    assert gap299 < np.abs(our_pool[64] - adm64).mean() / 10
    # (2u - 255) / 255 - (u - 128) / 128 = u / 32640: up to 1/128 at u = 255 (1 vs 127/128)
    torch.testing.assert_close(pf.pytorch_fid_input(x299) - pf.tf_input(x299), x299.float() / 32640,
                               atol=1e-6, rtol=0)


def _write_npz(path, images: torch.Tensor, **arrays):
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy(), **arrays)
    return path


def test_evaluate_writes_fid_and_suite_name(tmp_path, monkeypatch, cache, weights, theirs):
    """guidebench-evaluate metrics=pytorch_fid (dims 64: the stem only, so the 64x64 sqrtm is cheap) on an npz of
    samples, against an npz of reference images and against an npz of statistics (read as pytorch-fid does)."""
    from guidebench.cli.evaluate import main

    samples, ref_images = smooth_images(12, 32, 10), smooth_images(12, 32, 11)
    samples_npz = _write_npz(tmp_path / "samples.npz", samples, arr_1=np.arange(12))
    mu_file, sigma_file = _gaussian_stats(64, 200, 3, shift=0.2)
    references = {"images": _write_npz(tmp_path / "ref_images.npz", ref_images),
                  "stats": _write_npz(tmp_path / "ref_stats.npz", ref_images, mu=mu_file, sigma=sigma_file)}
    monkeypatch.chdir(tmp_path)
    written = {}
    for kind, reference in references.items():
        out = tmp_path / f"out-{kind}"
        monkeypatch.setattr(sys, "argv", [
            "guidebench-evaluate", "metrics=pytorch_fid", f"evaluation.samples={samples_npz}",
            f"evaluation.reference={reference}", f"evaluation.out_dir={out}", f"evaluation.cache_dir={cache}",
            "evaluation.device=cpu", "evaluation.verbose=false", "metrics.extractors.inception.options.dims=64",
            f"hydra.run.dir={tmp_path / 'hydra' / kind}"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main()
        written[kind] = json.loads((out / "metrics.json").read_text())

    s_feat = theirs(samples, dims=64)
    mu_s, sigma_s = s_feat.mean(0), np.cov(s_feat, rowvar=False)
    r_feat = theirs(ref_images, dims=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {"images": fid_score.calculate_frechet_distance(r_feat.mean(0), np.cov(r_feat, rowvar=False),
                                                                   mu_s, sigma_s),
                    "stats": fid_score.calculate_frechet_distance(mu_file, sigma_file, mu_s, sigma_s)}
    for kind, metrics in written.items():
        assert metrics["suite"] == "pytorch_fid"
        assert metrics["num_samples"] == 12 and metrics["reference"] == str(references[kind])
        assert metrics["fid"] == pytest.approx(float(expected[kind]), rel=1e-4)
        assert not {"sfid", "is", "precision", "recall", "kid"} & set(metrics)
        assert metrics["extractor"].endswith(":pytorch-fid-64")
    assert written["images"]["reference_stats_from_file"] == [] and written["images"]["num_reference"] == 12
    assert written["stats"]["reference_stats_from_file"] == ["pool"] and written["stats"]["num_reference"] is None
    assert list((cache / "references").glob("*pytorch-fid-64_pytorch-fid-as-stored_v*.npz"))  # image stats cached


def test_folder_reference_reads_as_pytorch_fid(tmp_path, cache, weights):
    """A folder: `*.<ext>` directly in it, sorted, as stored (PNG: lossless, so the npz's arr_0 statistics);
    reference_stats: file refuses an npz without mu/sigma; an npz's mu/sigma must fit dims."""
    from PIL import Image

    from guidebench.evaluation.reference import ReferenceError

    extractor = pf.load_pytorch_fid_inception(cache=cache, dims=64)
    images = smooth_images(4, 24, 20)
    folder = tmp_path / "ref"
    (folder / "nested").mkdir(parents=True)
    for i, im in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(folder / "nested" / "skipped.png")  # not recursive
    from_folder = pf.reference_statistics(folder, extractor, batch_size=3, cache=tmp_path / "c1")
    from_npz = pf.reference_statistics(_write_npz(tmp_path / "ref.npz", images), extractor, mode="images",
                                       cache=tmp_path / "c2")
    assert from_folder.num_images == from_npz.num_images == 4 and from_folder.resolution == (24, 24)
    for a, b in zip(from_folder.stats["pool"], from_npz.stats["pool"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    with pytest.raises(ReferenceError, match="no mu/sigma"):
        pf.reference_statistics(tmp_path / "ref.npz", extractor, mode="file")
    stats_2048 = _write_npz(tmp_path / "stats.npz", images, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ReferenceError, match="dims"):
        pf.evaluate_pytorch_fid([images], stats_2048, extractor, options={"dims": 64})


def test_suite_config_and_reference_map():
    from omegaconf import OmegaConf

    from guidebench.config import CONF_DIR
    from guidebench.paper_comparison import SUITE_EVALUATORS, paper_evaluator

    suite = OmegaConf.load(CONF_DIR / "metrics" / "pytorch_fid.yaml")
    assert suite.name == "pytorch_fid" and suite.engine == "pytorch_fid"
    assert SUITE_EVALUATORS[suite.name] == paper_evaluator("pytorch-fid (EluCD's evaluation_image.sh)")
    assert suite.references[128].file == "VIRTUAL_imagenet128_labeled.npz"  # EluCD's ADM-128 reference
    assert suite.references[64].file == "imagenet-64x64.npz"                # EluCD's EDM-64 reference
    assert list(suite.extractors.inception.metrics) == ["fid"]
