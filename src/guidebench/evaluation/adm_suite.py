"""The ADM evaluator's metrics suite on streamed samples: FID, sFID, IS, precision/recall (+ KID).

Equivalent of `python evaluations/evaluator.py REF.npz SAMPLES.npz` (guided-diffusion): the samples
stream once through the Inception network (`inception.load_inception`); the reference's statistics and
features come from `reference.reference_statistics` (ADM's own mu/sigma, mu_s/sigma_s when the file
has them, cached); the numbers are `adm_metrics`'. Suite options (conf/metrics/adm.yaml):

    metrics: [fid, sfid, isc, prc, kid]
    options: {is_split_size: 5000, prc_neighborhood: 3, prc_row_batch_size: 10000,
              prc_col_batch_size: 10000, prc_distance_dtype: float16, kid_subsets: 100, kid_subset_size: 1000}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from guidebench.checkpoints import download_advice
from guidebench.evaluation import adm_metrics
from guidebench.evaluation.reference import FeatureExtractor, ReferenceError, extract, reference_statistics

METRICS = ("fid", "sfid", "isc", "prc", "kid")
DEFAULT_OPTIONS = {"is_split_size": 5000, "prc_neighborhood": 3, "prc_row_batch_size": 10000,
                   "prc_col_batch_size": 10000, "prc_distance_dtype": "float16", "kid_subsets": 100,
                   "kid_subset_size": 1000, "kid_seed": 2020}


def reference_for_resolution(resolution: int, references: Mapping[Any, Mapping[str, str]],
                             reference_dir: str | Path) -> Path:
    """The suite's reference batch for samples of `resolution` (e.g. VIRTUAL_imagenet256_labeled.npz)."""
    entry = references.get(resolution) or references.get(str(resolution))
    if entry is None:
        raise ReferenceError(f"the suite has no reference batch for {resolution}x{resolution} samples "
                             f"(has {sorted(references)}); set evaluation.reference=PATH")
    path = Path(reference_dir) / entry["file"]
    if not path.is_file():
        raise ReferenceError(f"missing reference batch {path} (set evaluation.reference=PATH or "
                             f"metrics.reference_dir=DIR). Get it from: {entry['url']}{download_advice(path)}")
    return path


def evaluate_adm(samples: Iterable[torch.Tensor], reference: str | Path, extractor: FeatureExtractor, *,
                 metrics: Iterable[str] = METRICS, options: Mapping[str, Any] | None = None, suffix: str = "",
                 device: str | torch.device = "cpu", cache: str | Path | None = None,
                 reference_batch_size: int = 100, reference_size: int | None = None) -> dict[str, Any]:
    """Scores of `samples` (batches of uint8 [n, 3, H, W], in sample order) against `reference`.

    Returns {"fid", "sfid", "is", "precision", "recall", "kid", "kid_std"} for the requested metrics (each
    name + suffix), plus "is_unavailable" (the reason) when the extractor has no logits: IS is then None,
    never a substitute number. reference_size: center-crop a folder / other-size .npz reference to this
    size, or the resolution of a statistics-only (EDM2 .pkl) reference.
    """
    metrics = list(metrics)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {list(METRICS)}")
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    keep = tuple(k for k, wanted in (("pool", "prc" in metrics or "kid" in metrics),
                                     ("logits", "isc" in metrics and getattr(extractor, "has_logits", True)))
                 if wanted)
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        raise ValueError("no samples to evaluate")
    ref = reference_statistics(reference, extractor, image_size=reference_size,
                               keep=tuple(k for k in keep if k != "logits"), batch_size=reference_batch_size,
                               device=device, cache=cache)
    ref.check_compatible(tuple(first.shape[-2:]), extractor)

    def all_samples():
        yield first
        for batch in samples:
            if tuple(batch.shape[-2:]) != tuple(first.shape[-2:]):
                raise ReferenceError(f"samples of mixed resolution: {tuple(first.shape[-2:])} and "
                                     f"{tuple(batch.shape[-2:])}")
            yield batch

    moments, kept, count = extract(all_samples(), extractor, device, keep)
    out: dict[str, Any] = {"num_samples": count, "num_reference": ref.num_images}
    for metric, feature in (("fid", "pool"), ("sfid", "spatial")):
        if metric in metrics:
            if feature not in moments or feature not in ref.stats:
                raise ReferenceError(f"{metric} needs {feature!r} features from {extractor.name} and the reference")
            out[metric + suffix] = adm_metrics.frechet_distance(moments[feature].mean(), moments[feature].cov(),
                                                                *ref.stats[feature])
    if "isc" in metrics:
        if "logits" in kept:
            probs = adm_metrics.softmax(kept["logits"])
            out["is" + suffix] = adm_metrics.inception_score(probs, opts["is_split_size"])
        else:
            out["is" + suffix] = None
            out["is_unavailable" + suffix] = getattr(extractor, "logits_unavailable", None) or \
                f"{extractor.name} has no classifier logits"
    if ("prc" in metrics or "kid" in metrics) and "pool" not in ref.features:
        raise ReferenceError(f"{reference} holds statistics only; precision/recall and KID need its images")
    if "prc" in metrics:
        device_ref = torch.from_numpy(ref.features["pool"]).to(device)
        device_sample = torch.from_numpy(kept["pool"]).to(device)
        out["precision" + suffix], out["recall" + suffix] = adm_metrics.precision_recall(
            device_ref, device_sample, k=opts["prc_neighborhood"], row_batch_size=opts["prc_row_batch_size"],
            col_batch_size=opts["prc_col_batch_size"], distance_dtype=opts["prc_distance_dtype"])
    if "kid" in metrics:
        out["kid" + suffix], out["kid_std" + suffix] = adm_metrics.kernel_inception_distance(
            torch.from_numpy(kept["pool"]), torch.from_numpy(ref.features["pool"]), subsets=opts["kid_subsets"],
            subset_size=min(opts["kid_subset_size"], len(kept["pool"]), len(ref.features["pool"])),  # as the digits suite
            seed=opts["kid_seed"])
    out["reference_stats_from_file" + suffix] = list(ref.stats_from_file)
    out["extractor" + suffix] = extractor.name
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}


def load_extractor(label: str, spec: Mapping[str, Any], *, cache: str | Path | None = None,
                   device: str | torch.device = "cpu") -> FeatureExtractor:
    """The network of a suite's extractor entry (`name`: inception-2015-12-05 or dinov2-vitl14)."""
    if spec["name"] == "inception-2015-12-05":
        from guidebench.evaluation.inception import load_inception

        return load_inception(spec.get("checkpoint"), torchscript=spec.get("torchscript"), cache=cache, device=device)
    if spec["name"] == "dinov2-vitl14":
        from guidebench.evaluation.dinov2 import load_dinov2

        return load_dinov2(spec["checkpoint"], sha256=spec.get("sha256"), device=device)
    raise ValueError(f"metrics.extractors.{label}.name: unknown network {spec['name']!r} for the adm engine "
                     "(inception-2015-12-05, dinov2-vitl14)")


def evaluate_suite(samples: Callable[[], Iterable[torch.Tensor]], suite: Mapping[str, Any],
                   reference: str | Path | None = None, *, cache: str | Path | None = None,
                   device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every extractor of an `engine: adm` suite (conf/metrics/adm.yaml, edm2.yaml, fast.yaml).

    samples() returns a fresh iterator of uint8 [n, 3, H, W] batches in sample order (e.g. a DataLoader
    over the sample source, no shuffling); it is read once per extractor. reference None: the suite's
    `references` entry for the samples' resolution under `reference_dir`.
    """
    first = next(iter(samples()), None)
    if first is None:
        raise ValueError("no samples to evaluate")
    resolution = int(first.shape[-1])
    if reference is None:
        reference = reference_for_resolution(resolution, suite["references"], suite["reference_dir"])
    results: dict[str, Any] = {"reference": str(reference)}
    for label, spec in suite["extractors"].items():
        extractor = load_extractor(label, spec, cache=cache, device=device)
        results.update(evaluate_adm(samples(), reference, extractor, metrics=spec["metrics"],
                                    options=spec.get("options"), suffix=spec.get("suffix", ""), device=device,
                                    cache=cache, reference_size=resolution))
    return results
