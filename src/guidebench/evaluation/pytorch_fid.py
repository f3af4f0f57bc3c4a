"""pytorch-fid's FID (mseitzer/pytorch-fid 0.3.0, the evaluator of EluCD's numbers) on the ADM suite's weights.

EluCD (pytorch-fid-master/src/evaluation_image.sh) scores with

    python -m pytorch_fid --num-samples 50000 REFERENCE SAMPLE_FOLDER

i.e. `InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)` on PNG folders,
and `calculate_frechet_distance(mu_ref, sigma_ref, mu_samples, sigma_samples)`. This module computes the
same number with the ADM suite's Inception 2015-12-05 weights (`inception.converted_weights`, or
torch-fidelity's file): the network is torch-fidelity's `inception-v3-compat` module, the same layers
with the same parameter names as pytorch-fid's FID Inception (`pytorch_fid_state_dict`), run from its
first conv. What differs from the ADM suite is the preprocessing and the distance:

    pytorch-fid (this suite)                              ADM suite (adm_suite / TF graph)
    x = uint8 / 255 (PIL -> ToTensor, float32)            x = uint8 as float
    F.interpolate(x, 299, bilinear, align_corners=False)  TF1 bilinear resize (no half-pixel centres)
    2 * x - 1                                             (x - 128) / 128
    scipy sqrtm of sigma1 @ sigma2, + 1e-6 I if not       eigenvalues of L^T sigma2 L (adm_metrics)
    finite, |imag| check (atol 1e-3)

At 299x299 both resizes are the identity, so the features differ only through the normalisation
(2u / 255 - 1 vs (u - 128) / 128: the inputs differ by u / 32640, up to 1/128 at u = 255).

The reference is read as pytorch-fid reads a path: an `.npz` holding `mu` and `sigma` gives those
(ADM's reference batches: the TF evaluator's statistics of the whole training set; EDM's
fid-refs/imagenet-64x64.npz) -- so only the samples go through pytorch-fid's preprocessing, as in
EluCD's runs; a folder gives the statistics of its images (`*.<ext>` directly in it, sorted, as stored).
An `.npz` without statistics (which pytorch-fid cannot read) gives those of its `arr_0` images, as
pytorch-fid would on a PNG folder of them; `reference_stats: images` forces that for any `.npz`. Image
statistics are cached as the ADM suite's (`<cache>/references/`, keyed by content hash and extractor).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from guidebench.checkpoints import require_file, sha256_file
from guidebench.evaluation import inception as inc
from guidebench.evaluation.reference import (ReferenceError, ReferenceStats, _cache_path, _load_cached, _save_cached,
                                             content_hash, extract, iter_npz_batches, npz_array_info)

log = logging.getLogger(__name__)

PYTORCH_FID_VERSION = "0.3.0"
METRICS = ("fid",)
# pytorch-fid's --dims -> (its output block, the torch-fidelity layer that block ends with)
DIMS = {64: (0, "MaxPool_1"), 192: (1, "MaxPool_2"), 768: (2, "Mixed_6e"), 2048: (3, "AvgPool")}
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # fid_score.IMAGE_EXTENSIONS
REFERENCE_STATS = ("auto", "file", "images")
DEFAULT_OPTIONS = {"dims": 2048, "reference_stats": "auto", "eps": 1e-6, "reference_batch_size": 50}
INPUT_SIZE = 299


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and network


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 in [0, 1], as torchvision's ToTensor on the PIL image (x / 255)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.to(torch.float32).div(255)


def pytorch_fid_input(images: torch.Tensor) -> torch.Tensor:
    """What pytorch-fid's InceptionV3 feeds its first conv (resize_input, then normalize_input)."""
    x = F.interpolate(to_unit(images), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def tf_input(images: torch.Tensor) -> torch.Tensor:
    """What the ADM suite (TF graph, torch-fidelity) feeds the same first conv: TF1 bilinear, (x - 128) / 128."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE),
                                                  align_corners=False)
    return (x - 128) / 128


def pytorch_fid_state_dict(fidelity_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-fidelity inception-v3-compat state dict -> pytorch-fid's `fid_inception_v3()` (torchvision
    Inception3(num_classes=1008, aux_logits=False) with FIDInceptionA/C/E blocks) state dict.

    The two modules name their layers alike (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.running_mean,
    ..., fc.weight): the mapping is the identity on every key; pools carry no parameters.
    """
    return {key: value for key, value in fidelity_state.items()}


class PytorchFIDInception(torch.nn.Module):
    """uint8 images [N, 3, H, W] -> {"pool": [N, dims]}: pytorch-fid's features on the given weights.

    `net` is torch-fidelity's FeatureExtractorInceptionV3 (its own forward, with the TF preprocessing, is
    not used); `forward_input` runs its layers on an already preprocessed [N, 3, 299, 299] input up to
    pytorch-fid's block for `dims`, then global average pooling, as pytorch-fid's get_activations.
    """

    family = inc.FAMILY

    def __init__(self, net, name: str, dims: int = 2048):
        super().__init__()
        if dims not in DIMS:
            raise ValueError(f"dims must be one of pytorch-fid's {sorted(DIMS)}, got {dims}")
        self.net, self.dims = net, dims
        self.name = f"{name}:pytorch-fid-{dims}"
        last = DIMS[dims][1]
        names = [pt for _, pt in inc.LAYERS]
        self.layers = names[:names.index(last) + 1]

    @torch.no_grad()
    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.layers:
            x = getattr(self.net, name)(x)
        if x.shape[2:] != (1, 1):
            x = F.adaptive_avg_pool2d(x, output_size=(1, 1))
        return x.flatten(1).to(torch.float32)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": self.forward_input(pytorch_fid_input(images))}


def load_pytorch_fid_inception(fidelity_weights: str | Path | None = None, *, torchscript: str | Path | None = None,
                               cache: str | Path | None = None, device: str | torch.device = "cpu",
                               dims: int = 2048) -> PytorchFIDInception:
    """The ADM suite's Inception weights (`inception.load_inception`'s choice) in pytorch-fid's pipeline."""
    if fidelity_weights is not None:
        path = require_file(fidelity_weights, source=inc.FIDELITY_URL, sha256=inc.FIDELITY_SHA256,
                                config_key=inc.CONFIG_KEY_FIDELITY)
        net = inc._fidelity_extractor(path, ["2048"], inc.FIDELITY_URL)
        name = f"{inc.FAMILY}:torch-fidelity-{inc.FIDELITY_SHA256[:8]}"
    else:
        path = inc.converted_weights(torchscript, cache)
        net = inc._fidelity_extractor(path, ["2048"], inc.FID_HELPER_SOURCE)
        name = f"{inc.FAMILY}:fid-helper-{inc.FID_HELPER_SHA256[:8]}"
    return PytorchFIDInception(net, name, dims).to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Frechet distance, as pytorch_fid.fid_score.calculate_frechet_distance


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """pytorch-fid's FID: ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 @ sigma2)), float64,
    scipy's sqrtm of the product; if that is not finite, of (sigma1 + eps I) @ (sigma2 + eps I); a complex
    result whose diagonal has an imaginary part above 1e-3 raises ValueError, else its real part is used."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ReferenceError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                             f"sigma {sigma1.shape} vs {sigma2.shape} (pytorch-fid's dims must match the reference's)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # the matrix pytorch-fid's sqrtm(..., disp=False)[0] is
    if not np.isfinite(covmean).all():
        log.warning("fid calculation produces singular product; adding %s to diagonal of cov estimates", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------------
# Reference


def folder_images(folder: str | Path) -> list[Path]:
    """pytorch-fid's file list of a folder: `*.<ext>` for its extensions (not recursive), sorted."""
    folder = Path(folder)
    files = sorted(file for ext in IMAGE_EXTENSIONS for file in folder.glob(f"*.{ext}"))
    if not files:
        raise ReferenceError(f"no images (*.{', *.'.join(IMAGE_EXTENSIONS)}) directly in {folder}")
    return files


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(files), batch_size):
        images = [np.asarray(Image.open(p).convert("RGB")) for p in files[i:i + batch_size]]
        shapes = sorted({im.shape for im in images})
        if len(shapes) > 1:
            raise ReferenceError(f"images of different sizes in {files[i].parent} ({shapes}): pytorch-fid batches "
                                 "them as stored")
        yield np.stack(images)


def _file_statistics(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    with np.load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            return None
        family = str(f["extractor_family"]) if "extractor_family" in f.files else inc.FAMILY
        if family != inc.FAMILY:
            raise ReferenceError(f"{path}: its mu/sigma come from {family}, not {inc.FAMILY}")
        return f["mu"][:].astype(np.float64), f["sigma"][:].astype(np.float64)


def reference_statistics(source: str | Path, extractor: PytorchFIDInception, *, mode: str = "auto",
                         batch_size: int = 50, device: str | torch.device = "cpu",
                         cache: str | Path | None = None) -> ReferenceStats:
    """(mu, sigma) of a reference as pytorch-fid gets them (see the module docstring), as ReferenceStats:
    stats {"pool": (mu, sigma)}; stats_from_file ("pool",) when they are the file's own; resolution (0, 0)
    and num_images 0 for statistics without images."""
    if mode not in REFERENCE_STATS:
        raise ValueError(f"reference_stats must be one of {REFERENCE_STATS}, got {mode!r}")
    source = Path(source)
    if not source.exists():
        raise ReferenceError(f"reference {source} not found")
    if source.is_file() and source.suffix != ".npz":
        raise ReferenceError(f"{source}: pytorch-fid reads an .npz (mu, sigma / arr_0) or a folder of images")
    if source.is_file() and mode != "images":
        stats = _file_statistics(source)
        if stats is not None:  # read as they are: no hashing of a 10,000-image batch for two arrays
            return ReferenceStats(str(source), "", extractor.name, extractor.family, "file-statistics", (0, 0),
                                  0, {"pool": stats}, {}, ("pool",))
        if mode == "file":
            raise ReferenceError(f"{source} has no mu/sigma (reference_stats: file)")
    prep = "pytorch-fid-as-stored"
    digest = content_hash(source) if source.is_file() else _folder_hash(source)
    path = _cache_path(cache, digest, extractor, prep)
    if path.is_file():
        return _load_cached(path, source)
    if source.is_dir():
        batches = _folder_batches(folder_images(source), batch_size)
    else:
        shape, dtype = npz_array_info(source)
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
            raise ReferenceError(f"{source}: arr_0 must be uint8 [N, H, W, 3] images, got {dtype} {shape}")
        batches = iter_npz_batches(source, batch_size)
    sizes: set[tuple[int, int]] = set()
    moments, _, count = extract(batches, extractor, device, on_batch=lambda b: sizes.add(tuple(b.shape[1:3])))
    if count < 2:
        raise ReferenceError(f"reference {source} holds {count} images; a covariance needs at least 2")
    resolution = next(iter(sizes)) if len(sizes) == 1 else (0, 0)
    ref = ReferenceStats(str(source), digest, extractor.name, extractor.family, prep, resolution, count,
                         {"pool": (moments["pool"].mean(), moments["pool"].cov())})
    _save_cached(path, ref)
    return ref


def _folder_hash(folder: Path) -> str:
    """sha256 over the names and bytes of pytorch-fid's file list of the folder."""
    h = hashlib.sha256()
    for p in folder_images(folder):
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The suite


def evaluate_pytorch_fid(samples: Iterable[torch.Tensor], reference: str | Path, extractor: PytorchFIDInception, *,
                         metrics: Iterable[str] = METRICS, options: Mapping[str, Any] | None = None,
                         suffix: str = "", device: str | torch.device = "cpu",
                         cache: str | Path | None = None) -> dict[str, Any]:
    """pytorch-fid's FID of `samples` (uint8 [n, 3, H, W] batches) against `reference`."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"pytorch-fid computes FID only; unknown metrics {unknown}")
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    if int(opts["dims"]) != extractor.dims:
        raise ValueError(f"options.dims {opts['dims']} but the extractor gives {extractor.dims}")
    ref = reference_statistics(reference, extractor, mode=opts["reference_stats"],
                               batch_size=opts["reference_batch_size"], device=device, cache=cache)
    ref_dims = len(ref.stats["pool"][0])
    if ref_dims != extractor.dims:
        raise ReferenceError(f"reference {reference} has {ref_dims}-d statistics but options.dims is {extractor.dims} "
                             "(pytorch-fid's dims must match the reference's)")
    sizes: set[tuple[int, int]] = set()
    moments, _, count = extract(samples, extractor, device, on_batch=lambda b: sizes.add(tuple(b.shape[-2:])))
    if count < 2:
        raise ValueError(f"{count} samples: a covariance needs at least 2")
    if len(sizes) > 1:
        raise ReferenceError(f"samples of mixed resolution: {sorted(sizes)}")
    resolution = next(iter(sizes))
    if ref.num_images and ref.resolution != resolution:
        raise ReferenceError(f"samples are {resolution[0]}x{resolution[1]} but reference {reference}'s images are "
                             f"{ref.resolution[0]}x{ref.resolution[1]}: metrics across resolutions are not comparable")
    # EluCD's order: `python -m pytorch_fid REFERENCE SAMPLES` -> (mu1, sigma1) = the reference's
    fid = frechet_distance(*ref.stats["pool"], moments["pool"].mean(), moments["pool"].cov(), eps=opts["eps"])
    return {"num_samples": count, "num_reference": ref.num_images or None, "fid" + suffix: fid,
            "reference_stats_from_file" + suffix: list(ref.stats_from_file),
            "extractor" + suffix: extractor.name, "evaluator": f"pytorch-fid {PYTORCH_FID_VERSION}"}


def evaluate_suite(samples: Callable[[], Iterable[torch.Tensor]], suite: Mapping[str, Any],
                   reference: str | Path | None = None, *, cache: str | Path | None = None,
                   device: str | torch.device = "cpu") -> dict[str, Any]:
    """The `engine: pytorch_fid` suite (conf/metrics/pytorch_fid.yaml), as adm_suite.evaluate_suite: samples()
    returns a fresh iterator of uint8 [n, 3, H, W] batches; reference None: the suite's `references` entry
    for the samples' resolution under `reference_dir`."""
    from guidebench.evaluation.adm_suite import reference_for_resolution

    first = next(iter(samples()), None)
    if first is None:
        raise ValueError("no samples to evaluate")
    if reference is None:
        reference = reference_for_resolution(int(first.shape[-1]), suite["references"], suite["reference_dir"])
    results: dict[str, Any] = {"reference": str(reference)}
    for label, spec in suite["extractors"].items():
        if spec["name"] != inc.FAMILY:
            raise ValueError(f"metrics.extractors.{label}.name: the pytorch_fid engine runs {inc.FAMILY} only, "
                             f"got {spec['name']!r}")
        options = {**DEFAULT_OPTIONS, **(spec.get("options") or {})}
        extractor = load_pytorch_fid_inception(spec.get("checkpoint"), torchscript=spec.get("torchscript"),
                                               cache=cache, device=device, dims=int(options["dims"]))
        results.update(evaluate_pytorch_fid(samples(), reference, extractor, metrics=spec["metrics"], options=options,
                                            suffix=spec.get("suffix", ""), device=device, cache=cache))
    return results
