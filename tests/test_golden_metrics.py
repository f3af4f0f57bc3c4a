"""adm_metrics against the ADM evaluator's own numpy maths (golden metrics.pt, README section 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidebench.evaluation import adm_metrics
from tests.golden import load_golden

pytestmark = pytest.mark.golden

RTOL = 1e-4


@pytest.fixture(scope="module")
def g():
    return load_golden("metrics.pt")


def test_statistics(g):
    for which in ("ref", "sample"):
        mu, sigma = adm_metrics.feature_statistics(g[f"{which}_features"])
        np.testing.assert_allclose(mu, g[f"mu_{which}"].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sigma, g[f"sigma_{which}"].numpy(), rtol=1e-5, atol=1e-7)


def test_streaming_statistics_match_batch(g):
    feats = g["sample_features"].numpy()
    moments = adm_metrics.RunningMoments(feats.shape[1])
    for chunk in np.array_split(feats, 7):
        moments.update(chunk)
    np.testing.assert_allclose(moments.mean(), feats.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.cov(), np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_fid(g):
    stored = adm_metrics.frechet_distance(g["mu_sample"].numpy(), g["sigma_sample"].numpy(),
                                          g["mu_ref"].numpy(), g["sigma_ref"].numpy())
    assert stored == pytest.approx(g["fid"], rel=1e-6)
    from_features = adm_metrics.frechet_distance(*adm_metrics.feature_statistics(g["sample_features"]),
                                                 *adm_metrics.feature_statistics(g["ref_features"]))
    assert from_features == pytest.approx(g["fid"], rel=RTOL)


def adm_fid(mu1, sigma1, mu2, sigma2):
    """The ADM evaluator's route: Tr of scipy.linalg.sqrtm(Sigma1 Sigma2)."""
    from scipy import linalg

    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(linalg.sqrtm(sigma1 @ sigma2).real)


def test_fid_equals_sqrtm_route_on_other_statistics():
    rng = np.random.RandomState(0)
    for d, n in ((16, 40), (128, 400)):
        a, b = rng.randn(n, d), rng.randn(n, d) @ (np.eye(d) + 0.3 * rng.randn(d, d) / np.sqrt(d)) + 0.2
        s1, s2 = (a.mean(0), np.cov(a, rowvar=False)), (b.mean(0), np.cov(b, rowvar=False))
        assert adm_metrics.frechet_distance(*s1, *s2) == pytest.approx(adm_fid(*s1, *s2), rel=1e-8)
        assert adm_metrics.frechet_distance(*s1, *s1) == pytest.approx(0, abs=1e-8)


def test_fid_singular_covariances_stay_finite():
    rng = np.random.RandomState(1)
    a, b = rng.randn(10, 64), rng.randn(10, 64) + 1.0  # rank 9 covariances in 64 dimensions
    fid = adm_metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(fid) and fid > 64 * 0.9  # at least |mu1 - mu2|^2 ~ 64
    assert adm_metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), a.mean(0),
                                        np.cov(a, rowvar=False)) == pytest.approx(0, abs=1e-4)


def test_fid_refuses_mismatched_dimensions(g):
    mu, sigma = g["mu_ref"].numpy(), g["sigma_ref"].numpy()
    with pytest.raises(ValueError, match="different dimensions"):
        adm_metrics.frechet_distance(mu, sigma, mu[:-1], sigma[:-1, :-1])


def test_inception_score(g):
    probs = adm_metrics.softmax(g["is_logits"])
    np.testing.assert_allclose(probs, g["is_probs"].numpy(), rtol=1e-5, atol=1e-7)
    assert adm_metrics.inception_score(g["is_probs"].numpy(), g["is_split_size"]) == pytest.approx(
        g["inception_score"], rel=RTOL)
    assert adm_metrics.inception_score(probs, g["is_split_size"]) == pytest.approx(g["inception_score"], rel=RTOL)


def test_inception_score_splits_are_consecutive(g):
    """ADM splits in sample order: scores of the halves equal IS of each half alone."""
    probs = g["is_probs"].numpy()
    half = len(probs) // 2
    splits = adm_metrics.inception_score_splits(probs, half)
    assert splits[0] == pytest.approx(adm_metrics.inception_score(probs[:half], len(probs)), rel=1e-6)
    assert splits[1] == pytest.approx(adm_metrics.inception_score(probs[half:2 * half], len(probs)), rel=1e-6)


def test_radii(g):
    kw = dict(k=g["nhood_sizes"][0], row_batch_size=g["row_batch_size"], col_batch_size=g["col_batch_size"])
    for which in ("ref", "sample"):
        radii = adm_metrics.manifold_radii(g[f"{which}_features"], **kw)
        np.testing.assert_allclose(radii.numpy(), g[f"radii_{which}"][:, 0].numpy(), rtol=1e-5)


@pytest.mark.parametrize("blocks", ["golden", "small"])
def test_precision_recall(g, blocks):
    """Exact (float32 distances); smaller blocks leave the float32 numbers unchanged."""
    rows, cols = (g["row_batch_size"], g["col_batch_size"]) if blocks == "golden" else (700, 450)
    p, r = adm_metrics.precision_recall(g["ref_features"], g["sample_features"], k=g["nhood_sizes"][0],
                                        row_batch_size=rows, col_batch_size=cols)
    assert p == pytest.approx(g["precision"], rel=RTOL)
    assert r == pytest.approx(g["recall"], rel=RTOL)


def test_precision_recall_fp16_path(g):
    """ADM's float16 distance path; golden is itself an emulation, good to a few samples (README)."""
    n = len(g["sample_features"])
    p, r = adm_metrics.precision_recall(g["ref_features"], g["sample_features"], k=g["nhood_sizes"][0],
                                        row_batch_size=g["row_batch_size"], col_batch_size=g["col_batch_size"],
                                        distance_dtype="float16")
    assert abs(p - g["precision_fp16emu"]) <= 3 / n
    assert abs(r - g["recall_fp16emu"]) <= 3 / n


def test_fp16_overflow_falls_back_to_float32(g):
    big = g["ref_features"][:50] * 100.0  # squared norms > 65504: float16 overflows
    d16 = adm_metrics.pairwise_sq_distances(big, big, "float16")
    d32 = adm_metrics.pairwise_sq_distances(big, big, "float32")
    assert torch.isfinite(d16).all() and torch.equal(d16, d32)


def test_precision_recall_identical_sets(g):
    feats = g["ref_features"][:500]
    assert adm_metrics.precision_recall(feats, feats.clone()) == (1.0, 1.0)


def test_kid_zero_for_same_distribution(g):
    same, _ = adm_metrics.kernel_inception_distance(g["ref_features"][:1500], g["ref_features"][1500:],
                                                    subsets=10, subset_size=500)
    shifted, _ = adm_metrics.kernel_inception_distance(g["sample_features"], g["ref_features"],
                                                       subsets=10, subset_size=500)
    assert abs(same) < 0.1 * shifted
    with pytest.raises(ValueError, match="subset_size"):
        adm_metrics.kernel_inception_distance(g["sample_features"][:100], g["ref_features"], subset_size=500)
