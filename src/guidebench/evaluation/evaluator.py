"""Score a sample source against a reference with torch-fidelity; write metrics.json.

A metrics suite (conf/metrics/NAME.yaml) names its reference and, per feature extractor, the torch-fidelity
metrics computed in that extractor's feature space:

    name: digits
    reference: digits-heldout          # a path (run/shard folder, ADM npz, image folder) or a registered name
    extractors:
      evalnet:                         # a label, used in config keys and error messages
        name: digits-evalnet           # a torch-fidelity feature extractor (see extractors.py)
        checkpoint: PATH               # its weights (feature_extractor_weights_path); null: its own download
        checkpoint_source: TEXT        # how to get the checkpoint, shown when it is missing
        metrics: [fid, isc, prc, kid]  # torch-fidelity's metric flags
        suffix: ""                     # appended to this extractor's metric names, e.g. "_dinov2"
        options: {prc_neighborhood: 3} # further torch_fidelity.calculate_metrics kwargs
    accuracy: evalnet                  # label of an evaluation-network extractor whose argmax is compared with
                                       # the samples' labels; null: no accuracy

The reference's features and statistics are cached by torch-fidelity under cache_dir, keyed by the sha256
of the reference's files and of the extractor's weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch_fidelity
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

from guidebench.checkpoints import require_file, sha256_file
from guidebench.evaluation.extractors import EvalNetExtractor
from guidebench.evaluation.sources import SampleSource, check_compatible, open_samples, open_source, reference_path

# torch-fidelity's result keys -> guidebench's metric names
METRIC_NAMES = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "is",
    torch_fidelity.KEY_METRIC_ISC_STD: "is_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
}


def evaluate(samples: str | Path, reference: str | Path | None, metrics_cfg: Mapping[str, Any],
             out_dir: str | Path, *, cache_dir: str | Path, device: str = "auto", batch_size: int = 256,
             verbose: bool = True, allow_incomplete: bool = False) -> dict[str, Any]:
    """Metrics of `samples` against `reference` (None: the suite's) under suite `metrics_cfg`; writes
    out_dir/metrics.json and returns its contents.

    A run folder is scored only if its shards are exactly the set its run.json lists; `allow_incomplete`
    scores its verified shards anyway and records "complete": false (`sources.open_samples`).

    Suites with `engine: adm` (conf/metrics/adm.yaml, edm2.yaml, fast.yaml) reproduce the ADM evaluator
    (guidebench.evaluation.adm_suite), `engine: pytorch_fid` (pytorch_fid.yaml) pytorch-fid's FID
    (guidebench.evaluation.pytorch_fid); the others run torch-fidelity in their extractors' feature spaces.
    """
    suite = OmegaConf.to_container(metrics_cfg, resolve=True) if isinstance(metrics_cfg, DictConfig) else metrics_cfg
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    sample_source = open_samples(samples, allow_incomplete)
    results: dict[str, Any] = {"suite": suite.get("name"), "samples": str(samples), "num_samples": len(sample_source),
                               "nonfinite": sample_source.nonfinite, "complete": sample_source.complete,
                               "num_requested": sample_source.requested}
    if suite.get("engine") in ("adm", "pytorch_fid"):
        if suite["engine"] == "adm":
            from guidebench.evaluation.adm_suite import evaluate_suite
        else:
            from guidebench.evaluation.pytorch_fid import evaluate_suite

        results["reference"] = str(reference) if reference else None
        results.update(evaluate_suite(lambda: DataLoader(sample_source, batch_size=batch_size), suite, reference,
                                      cache=cache_dir, device=device))
    else:
        results.update(_evaluate_fidelity(sample_source, reference, suite, cache_dir=cache_dir, device=device,
                                          batch_size=batch_size, verbose=verbose))
    if suite.get("accuracy"):
        spec = suite["extractors"][suite["accuracy"]]
        results["accuracy"] = accuracy(sample_source, spec["name"], _weights(suite["accuracy"], spec),
                                       device=device, batch_size=batch_size, verbose=verbose)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _evaluate_fidelity(sample_source: SampleSource, reference: str | Path | None, suite: Mapping[str, Any], *,
                       cache_dir: str | Path, device: str, batch_size: int, verbose: bool) -> dict[str, Any]:
    """torch-fidelity's FID/IS/PRC/KID for each extractor of the suite, against a sample-source reference."""
    reference = reference or suite.get("reference")
    if not reference:
        raise ValueError("no reference to compare with: set evaluation.reference=PATH or the suite's reference")
    reference = reference_path(reference, cache_dir)
    reference_source = open_source(reference)
    check_compatible(sample_source, reference_source)
    reference_hash = content_hash(reference_source.files)
    results: dict[str, Any] = {"reference": str(reference), "num_reference": len(reference_source)}
    for label, spec in suite["extractors"].items():
        weights = _weights(label, spec)
        cache_name = f"{reference.stem}-{reference_hash[:16]}-{sha256_file(weights)[:16] if weights else 'default'}"
        options = dict(spec.get("options") or {})
        if "kid" in spec["metrics"]:
            options["kid_subset_size"] = min(options.get("kid_subset_size", 1000), len(sample_source),
                                             len(reference_source))
        scores = torch_fidelity.calculate_metrics(
            input1=sample_source, input2=reference_source, input2_cache_name=cache_name,
            feature_extractor=spec["name"], feature_extractor_weights_path=weights and str(weights),
            **{metric: True for metric in spec["metrics"]}, **options,
            cuda=device.startswith("cuda"), batch_size=batch_size, save_cpu_ram=True,  # save_cpu_ram: no workers
            cache=True, cache_root=str(Path(cache_dir).expanduser() / "torch-fidelity"), verbose=verbose)
        results.update({METRIC_NAMES[key] + spec.get("suffix", ""): float(v) for key, v in scores.items()})
    return results


@torch.no_grad()
def accuracy(source: SampleSource, extractor: str, weights: Path, *, device: str = "cpu", batch_size: int = 256,
             verbose: bool = True) -> float | None:
    """Fraction of labelled samples (label >= 0) whose evaluation-network argmax is their label; None if none."""
    cls = FEATURE_EXTRACTORS_REGISTRY.get(extractor)
    if cls is None or not issubclass(cls, EvalNetExtractor):
        raise ValueError(f"accuracy needs an evaluation-network extractor (register_evalnet); got {extractor!r}")
    if source.labels is None or not (source.labels >= 0).any():
        return None
    net = cls(extractor, ["logits_unbiased"], feature_extractor_weights_path=str(weights)).eval().to(device)
    predictions = []
    for images in tqdm(DataLoader(source, batch_size=batch_size), desc="accuracy", unit="batch", disable=not verbose):
        predictions.append(net(images.to(device))[0].argmax(dim=1).cpu().numpy())
    labelled = source.labels >= 0
    return float(np.mean(np.concatenate(predictions)[labelled] == source.labels[labelled]))


def content_hash(files: list[Path]) -> str:
    """sha256 over the names and bytes of `files`, in order."""
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode() + b"\0" + sha256_file(file).encode())
    return h.hexdigest()


def _weights(label: str, spec: Mapping[str, Any]) -> Path | None:
    if spec.get("checkpoint") is None:
        return None
    return require_file(spec["checkpoint"], source=spec.get("checkpoint_source", f"the weights of {spec['name']}"),
                        config_key=f"metrics.extractors.{label}.checkpoint")
