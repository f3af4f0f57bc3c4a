"""The maths of the ADM evaluator (guided-diffusion `evaluations/evaluator.py`) on feature arrays.

Each function reproduces the number the ADM evaluator computes from the same features; where the
evaluator's batching or dtype changes the result, the same choice is made here and named.

* FID (Heusel et al. 2017, eq. 6) and sFID (Nash et al. 2021: the same distance on spatial features)
* Inception Score (Salimans et al. 2016) with ADM's split convention
* improved precision / recall (Kynkaanniemi et al. 2019, eq. 1-3) as ADM's `ManifoldEstimator`
* KID (Binkowski et al. 2018) through torch-fidelity, which ADM does not compute
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

# --------------------------------------------------------------------------------------------------
# Frechet distance


class RunningMoments:
    """Streaming mean and covariance of feature batches (Chan et al. 1979 pairwise update), float64.

    Equal to `np.mean(x, 0)` and `np.cov(x, rowvar=False)` (unbiased, divisor n - 1) of all rows seen,
    without keeping them: memory is O(d^2), whatever the number of samples.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._m2 = np.zeros((dim, dim), dtype=np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        x = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
        x = x.reshape(len(x), -1).astype(np.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions, expected {self.dim}")
        if len(x) == 0:
            return
        n_b = len(x)
        mean_b = x.mean(0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        delta = mean_b - self._mean
        n = self.n + n_b
        self._m2 += m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self._mean += delta * (n_b / n)
        self.n = n

    def mean(self) -> np.ndarray:
        return self._mean.copy()

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self._m2 / (self.n - 1)


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) of a [N, d] feature array: mean over samples and unbiased covariance (float64)."""
    moments = RunningMoments(int(np.prod(features.shape[1:])))
    moments.update(features)
    return moments.mean(), moments.cov()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, Sigma1) and N(mu2, Sigma2) (Heusel et al. 2017, eq. 6):

        d^2 = |mu1 - mu2|^2 + Tr(Sigma1) + Tr(Sigma2) - 2 Tr((Sigma1 Sigma2)^{1/2})

    FID uses pool_3 features, sFID the spatial mixed_6/conv features (Nash et al. 2021): same formula.
    The ADM evaluator takes Tr((Sigma1 Sigma2)^{1/2}) from `scipy.linalg.sqrtm` of the product (adding
    1e-6 I to both covariances if that is not finite). Here it is sum_i sqrt(lambda_i) over the eigenvalues
    of the symmetric PSD matrix L^T Sigma2 L, with Sigma1 = L L^T (Cholesky; the PSD square root of Sigma1
    if it is singular), which has the same eigenvalues as Sigma1 Sigma2: equal to ADM's value to ~1e-9
    relative for full-rank covariances (tests compare both),
    several times faster at d = 2048, and well defined when the covariances are singular (fewer samples
    than dimensions), where negative round-off eigenvalues are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape} (features from different extractors?)")
    try:  # Sigma1 = L L^T: L^T Sigma2 L is similar to Sigma1 Sigma2
        factor = linalg.cholesky(sigma1, lower=True)
    except linalg.LinAlgError:  # singular Sigma1: its PSD square root instead
        w, v = linalg.eigh(sigma1, driver="evd")
        factor = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    product = factor.T @ sigma2 @ factor
    eigenvalues = linalg.eigvalsh((product + product.T) / 2, driver="evd")
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# --------------------------------------------------------------------------------------------------
# Inception Score


def softmax(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float32 softmax over the last axis (the ADM evaluator's tf.nn.softmax of pool_3 @ W)."""
    x = logits.detach().cpu().numpy() if torch.is_tensor(logits) else np.asarray(logits)
    x = x.astype(np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def inception_score_splits(probs: np.ndarray, split_size: int = 5000) -> list[float]:
    """Per-split Inception Scores (Salimans et al. 2016), ADM convention:

        IS = exp( E_x KL( p(y|x) || p(y) ) ),  p(y) = mean of p(y|x) over the split,

    on consecutive splits of `split_size` rows in sample order (no shuffle; a last shorter split counts
    as a split), in float32 as the ADM evaluator. torch-fidelity instead shuffles (seed 2020) and cuts
    N/10-row splits in float64, so its number differs unless N = 10 * split_size and the order does not
    matter. For ADM's 50,000 samples both use 10 splits of 5,000, but different rows in each.
    """
    probs = np.asarray(probs, dtype=np.float32)
    scores = []
    for start in range(0, len(probs), split_size):
        p = probs[start:start + split_size]
        marginal = p.mean(axis=0, keepdims=True)
        kl = (p * (np.log(p) - np.log(marginal))).sum(axis=1).mean()
        scores.append(float(np.exp(kl)))
    return scores


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Mean of `inception_score_splits` (what ADM reports)."""
    if len(probs) == 0:
        raise ValueError("Inception Score of zero samples")
    return float(np.mean(inception_score_splits(probs, split_size)))


# --------------------------------------------------------------------------------------------------
# Improved precision / recall


def _round16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Squared Euclidean distances D_ij = max(|u_i|^2 - 2 u_i.v_j + |v_j|^2, 0), float32 [len(u), len(v)].

    dtype="float32": float32 arithmetic. dtype="float16": the ADM evaluator's first choice (its TF
    DistanceBlock casts the features to float16 and falls back to float32 only if any distance of the
    block overflows); emulated device-independently as float32 operations each rounded to float16, so
    it may differ from TF's own fp16 kernels by an ulp on a few pairs.
    """
    u, v = u.to(torch.float32), v.to(torch.float32)
    if dtype == "float16":
        u16, v16 = _round16(u), _round16(v)
        norm_u = _round16(_round16(u16 * u16).sum(1))
        norm_v = _round16(_round16(v16 * v16).sum(1))
        cross = _round16(2 * _round16(u16 @ v16.T))
        d = _round16(_round16(norm_u[:, None] - cross) + norm_v[None, :]).clamp_min(0)
        if torch.isfinite(d).all():
            return d
    elif dtype != "float32":
        raise ValueError(f"distance dtype must be 'float32' or 'float16', got {dtype!r}")
    norm_u = (u * u).sum(1)
    norm_v = (v * v).sum(1)
    return (norm_u[:, None] - 2 * (u @ v.T) + norm_v[None, :]).clamp_min(0)


class _FullPrecisionMatmul:
    """Disables TF32 inside the block (distances must be float32-exact on GPUs too)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def manifold_radii(features: torch.Tensor, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000,
                   distance_dtype: str = "float32") -> torch.Tensor:
    """Radius of each sample's k-NN ball (Kynkaanniemi et al. 2019, eq. 2), as ADM's ManifoldEstimator:

        r_i = D(phi_i, NN_k(phi_i)),  the (k+1)-th smallest entry of row i of D (phi_i itself included),

    with D the SQUARED Euclidean distance of `pairwise_sq_distances`, computed in blocks of
    row_batch_size x col_batch_size (the block is the unit of ADM's float16 overflow fallback).
    Returns float32 [N].
    """
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} samples, got {len(features)}")
    radii = []
    with _FullPrecisionMatmul():
        for rows in features.split(row_batch_size):
            d = torch.cat([pairwise_sq_distances(rows, cols, distance_dtype)
                           for cols in features.split(col_batch_size)], dim=1)
            radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_features: torch.Tensor, sample_features: torch.Tensor, k: int = 3,
                     row_batch_size: int = 10000, col_batch_size: int = 10000,
                     distance_dtype: str = "float32") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1 and 3) as the ADM evaluator:

        f(phi, Phi) = 1 if D(phi, phi') <= r(phi') for some phi' in Phi, else 0
        precision = mean_{phi_g in samples} f(phi_g, refs),  recall = mean_{phi_r in refs} f(phi_r, samples)

    with r the k-NN radii of `manifold_radii` (<= on squared distances). Reference rows are cut in
    row_batch_size blocks and sample rows in col_batch_size blocks, as ADM's `evaluate_pr`.
    """
    if ref_features.shape[1:] != sample_features.shape[1:]:
        raise ValueError(f"feature shapes differ: references {tuple(ref_features.shape)}, "
                         f"samples {tuple(sample_features.shape)}")
    kw = dict(k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size, distance_dtype=distance_dtype)
    ref_radii = manifold_radii(ref_features, **kw)
    sample_radii = manifold_radii(sample_features, **kw)
    ref_in = torch.zeros(len(ref_features), dtype=torch.bool, device=ref_features.device)
    sample_in = torch.zeros(len(sample_features), dtype=torch.bool, device=sample_features.device)
    with _FullPrecisionMatmul():
        for i in range(0, len(ref_features), row_batch_size):
            refs = ref_features[i:i + row_batch_size]
            for j in range(0, len(sample_features), col_batch_size):
                d = pairwise_sq_distances(refs, sample_features[j:j + col_batch_size], distance_dtype)
                ref_in[i:i + row_batch_size] |= (d <= sample_radii[None, j:j + col_batch_size]).any(1)
                sample_in[j:j + col_batch_size] |= (d <= ref_radii[i:i + row_batch_size, None]).any(0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


# --------------------------------------------------------------------------------------------------
# KID


def kernel_inception_distance(sample_features: torch.Tensor, ref_features: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of `subset_size` rows of each set.
    torch-fidelity's implementation (`kid_features_to_metric`); returns (mean, std) over subsets.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if min(len(sample_features), len(ref_features)) < subset_size:
        raise ValueError(f"KID subset_size {subset_size} exceeds the samples ({len(sample_features)}) or "
                         f"references ({len(ref_features)}); lower the suite's kid subset_size")
    out = kid_features_to_metric(sample_features.float().cpu(), ref_features.float().cpu(), kid_subsets=subsets,
                                 kid_subset_size=subset_size, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]
