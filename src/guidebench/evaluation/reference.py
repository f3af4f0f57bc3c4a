"""Reference batches in the ADM evaluator's format: read, build, and their cached statistics.

An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) is an `.npz` holding `arr_0`, uint8
images [N, H, W, 3] (10,000 for ImageNet: precision/recall are computed against them), and `mu`,
`sigma` / `mu_s`, `sigma_s`: pool_3 / spatial Inception statistics over the whole dataset, which the ADM
evaluator uses for FID / sFID instead of statistics of `arr_0`. `arr_1` (labels) may be present.

`build_reference` makes the same format from a folder or `.npz` of real images with ADM's
preprocessing (guided-diffusion image_datasets.py `center_crop_arr`), so references for other data
sets are made as ADM's were. `reference_statistics` turns a reference into features and statistics for
a given extractor, streaming over the images, and caches them under the content hash of the source,
the extractor's name and the preprocessing.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from guidebench.checkpoints import sha256_file
from guidebench.evaluation.adm_metrics import RunningMoments
from guidebench.evaluation.inception import FAMILY as INCEPTION_FAMILY, cache_dir

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CACHE_VERSION = 1
# ADM's names for the statistics of each Inception feature.
ADM_STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


class ReferenceError(ValueError):
    """A reference batch is unusable or does not fit the samples / extractor it is compared with."""


class FeatureExtractor(Protocol):
    """uint8 [N, 3, H, W] -> {feature name: [N, d] tensor}; `name` identifies the weights, `family` the network."""

    name: str
    family: str

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------------------
# ADM preprocessing


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing of a real image to image_size x image_size (uint8 [H, W, 3]):

    halve with BOX filtering while the short side is at least 2 * image_size, resize with BICUBIC so the
    short side is image_size (each side rounded), then take the centre crop.
    """
    image = image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


# ---------------------------------------------------------------------------------------------------------
# Streaming .npz arrays (a reference can hold 50,000 512x512 images: never load arr_0 whole)


def npz_array_info(path: str | Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    with _open_member(path, key) as f:
        shape, _, dtype = _read_header(f, path, key)
    return shape, dtype


def iter_npz_batches(path: str | Path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Consecutive [<=batch_size, ...] slices of array `key` of an .npz, read from the zip member in pieces."""
    with _open_member(path, key) as f:
        shape, fortran, dtype = _read_header(f, path, key)
        if fortran or dtype.hasobject:
            raise ReferenceError(f"{path}: {key} is Fortran-ordered or an object array; "
                                 "save it C-ordered with np.savez")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise ReferenceError(f"{path}: {key} is truncated (rows {start}..{start + n} missing)")
            yield np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])


@contextmanager
def _open_member(path: str | Path, key: str):
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ReferenceError(f"cannot read {path} as an .npz: {e}") from e
    with archive:
        if f"{key}.npy" not in archive.namelist():
            raise ReferenceError(f"{path} has no array {key!r} (has {sorted(n[:-4] for n in archive.namelist())})")
        with archive.open(f"{key}.npy") as member:
            yield member


def _read_header(f, path, key):
    try:
        version = np.lib.format.read_magic(f)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        return reader(f)
    except (ValueError, KeyError) as e:
        raise ReferenceError(f"{path}: {key}.npy has an unreadable header ({e})") from e


class NpzWriter:
    """Writes an .npz whose `arr_0` is streamed in (shape known up front), plus small arrays at the end."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype=np.uint8):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.shape, self.dtype, self.rows = tuple(shape), np.dtype(dtype), 0
        self.archive = zipfile.ZipFile(self.tmp, "w", allowZip64=True)
        self.member = self.archive.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self.member, header)

    def append(self, batch: np.ndarray) -> None:
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        if batch.shape[1:] != self.shape[1:] or self.rows + len(batch) > self.shape[0]:
            raise ValueError(f"batch {batch.shape} does not fit arr_0 {self.shape} after {self.rows} rows")
        self.member.write(batch.tobytes())
        self.rows += len(batch)

    def close(self, **arrays: np.ndarray) -> Path:
        if self.rows != self.shape[0]:
            raise ValueError(f"arr_0 got {self.rows} of {self.shape[0]} rows")
        self.member.close()
        for key, value in arrays.items():
            with self.archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
        self.archive.close()
        os.replace(self.tmp, self.path)
        return self.path


# ---------------------------------------------------------------------------------------------------------
# Image sources


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ReferenceError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def _iter_source(source: Path, image_size: int | None, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    """(number of images, iterator of uint8 [n, S, S, 3] batches) of a folder or .npz, center-cropped to
    image_size with `center_crop_arr` (an .npz whose images already have that size is used as stored)."""
    if source.is_dir():
        if image_size is None:
            raise ReferenceError(f"{source} is a folder of images: give image_size to center-crop them to")
        files = list_images(source)

        def folder_batches():
            for i in range(0, len(files), batch_size):
                yield np.stack([center_crop_arr(Image.open(p), image_size) for p in files[i:i + batch_size]])

        return len(files), folder_batches()
    shape, dtype = npz_array_info(source)
    if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
        raise ReferenceError(f"{source}: arr_0 must be uint8 [N, H, W, 3] images, got {dtype} {shape}")
    if image_size is None or shape[1:3] == (image_size, image_size):
        return shape[0], iter_npz_batches(source, batch_size)

    def cropped():
        for batch in iter_npz_batches(source, batch_size):
            yield np.stack([center_crop_arr(Image.fromarray(im), image_size) for im in batch])

    return shape[0], cropped()


def preprocessing_name(source: Path, image_size: int | None) -> str:
    if source.is_file() and (image_size is None or npz_array_info(source)[0][1:3] == (image_size, image_size)):
        return "as-stored"
    return f"center_crop_arr-{image_size}"


def content_hash(source: str | Path) -> str:
    """sha256 of an .npz file, or of a folder's images (relative paths and bytes, in sorted order)."""
    source = Path(source)
    if source.is_file():
        return sha256_file(source)
    h = hashlib.sha256()
    for p in list_images(source):
        h.update(str(p.relative_to(source)).encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# EDM2 reference statistics (dataset-refs/img{64,512}.pkl: {"fid": {mu, sigma}, "fd_dinov2": {mu, sigma}})

# Which EDM2 statistics belong to which network family.
EDM2_STAT_KEYS = {INCEPTION_FAMILY: "fid", "dinov2-vitl14": "fd_dinov2"}
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar")}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts / lists of numpy arrays and nothing else (no code runs from the file)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)


def read_stats_pickle(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """EDM2's reference statistics: {metric: (mu, sigma)}, read without executing anything from the file."""
    try:
        with open(path, "rb") as f:
            data = _ArraysOnlyUnpickler(f).load()
        return {metric: (np.asarray(v["mu"], np.float64), np.asarray(v["sigma"], np.float64))
                for metric, v in data.items()}
    except (pickle.UnpicklingError, EOFError, TypeError, KeyError, AttributeError) as e:
        raise ReferenceError(f"{path} is not an EDM2 statistics pickle ({{metric: {{mu, sigma}}}}): {e}") from e


# ---------------------------------------------------------------------------------------------------------
# Features and statistics


@torch.no_grad()
def extract(batches: Iterable[np.ndarray | torch.Tensor], extractor: Callable, device: str | torch.device = "cpu",
            keep: tuple[str, ...] = (), on_batch: Callable[[np.ndarray], None] | None = None
            ) -> tuple[dict[str, RunningMoments], dict[str, np.ndarray], int]:
    """Stream image batches (uint8 numpy [n, H, W, 3] or torch [n, 3, H, W]) through `extractor`.

    Returns running moments of every feature except logits (their statistics), the full float32 arrays
    of the features named in `keep` (e.g. pool for precision/recall, logits for IS), and the count.
    Memory: one batch of images, d x d moments per feature, and the kept arrays.
    """
    moments: dict[str, RunningMoments] = {}
    kept: dict[str, list[np.ndarray]] = {k: [] for k in keep}
    count = 0
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        for key, value in extractor(batch.to(device)).items():
            value = value.float().cpu()
            if key != "logits":
                moments.setdefault(key, RunningMoments(value.shape[1])).update(value)
            if key in kept:
                kept[key].append(value.numpy())
        count += len(batch)
    missing = [k for k in keep if not kept[k]]
    if count and missing:
        raise ReferenceError(f"extractor {getattr(extractor, 'name', extractor)} gives no {missing} features")
    return moments, {k: np.concatenate(v) for k, v in kept.items() if v}, count


def build_reference(source: str | Path, out: str | Path, image_size: int, extractor: FeatureExtractor | None = None,
                    *, batch_size: int = 100, device: str | torch.device = "cpu", max_images: int | None = None,
                    cache: str | Path | None = None) -> Path:
    """Write an ADM-format reference batch: `arr_0` = center_crop_arr(image, image_size) of every image of
    `source` (a folder, recursively in sorted path order, or an .npz's arr_0), and, with an extractor,
    `mu`, `sigma`, `mu_s`, `sigma_s` over those images (the features it gives: pool, spatial). Also stores
    `extractor` (its name), `extractor_family` and `image_size`, which the ADM evaluator ignores. With an
    extractor, the result's statistics and pool features also go into the cache, so evaluating against
    the new reference does not extract them again.
    """
    source, out = Path(source), Path(out)
    n, batches = _iter_source(source, image_size, batch_size)
    if max_images is not None:
        n = min(n, max_images)
        batches = _take(batches, n)
    writer = NpzWriter(out, (n, image_size, image_size, 3))
    arrays: dict[str, np.ndarray] = {"image_size": np.asarray(image_size)}
    if extractor is None:
        for batch in batches:
            writer.append(batch)
        return writer.close(**arrays)
    moments, features, count = extract(batches, extractor, device, keep=("pool",), on_batch=writer.append)
    for key, (mu_key, sigma_key) in ADM_STAT_KEYS.items():
        if key in moments:
            arrays[mu_key], arrays[sigma_key] = moments[key].mean(), moments[key].cov()
    arrays["extractor"], arrays["extractor_family"] = np.asarray(extractor.name), np.asarray(extractor.family)
    writer.close(**arrays)
    digest = content_hash(out)
    stats = {k: (m.mean(), m.cov()) for k, m in moments.items()}
    _save_cached(_cache_path(cache, digest, extractor, "as-stored"),
                 ReferenceStats(str(out), digest, extractor.name, extractor.family, "as-stored", (image_size,) * 2,
                                count, stats, features, tuple(k for k in ADM_STAT_KEYS if k in stats)))
    return out


def _take(batches: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    for batch in batches:
        if n <= 0:
            return
        yield batch[:n]
        n -= len(batch)


@dataclass
class ReferenceStats:
    """Statistics of a reference for one extractor.

    stats: {feature: (mu, sigma)}; features: {feature: [N, d]} of arr_0 (precision/recall, KID);
    stats_from_file: features whose statistics are the reference file's own (ADM's mu/sigma, mu_s/sigma_s).
    """

    source: str
    content_hash: str
    extractor: str
    family: str
    preprocessing: str
    resolution: tuple[int, int]
    num_images: int
    stats: dict[str, tuple[np.ndarray, np.ndarray]]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    stats_from_file: tuple[str, ...] = ()

    def check_compatible(self, resolution: tuple[int, int] | int, extractor: FeatureExtractor) -> None:
        """Refuse samples of another resolution, or an extractor of another network."""
        resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if resolution != self.resolution:
            raise ReferenceError(
                f"samples are {resolution[0]}x{resolution[1]} but reference {self.source} is "
                f"{self.resolution[0]}x{self.resolution[1]}: metrics across resolutions are not comparable. "
                "Use the reference batch of the samples' resolution (or build one with build_reference)")
        if extractor.family != self.family:
            raise ReferenceError(f"reference statistics of {self.source} come from {self.family}, the samples' "
                                 f"features from {extractor.family}; they cannot be compared")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def _cache_path(cache: str | Path | None, digest: str, extractor: FeatureExtractor, preprocessing: str) -> Path:
    """Cached statistics of a reference: keyed by content hash, extractor name and preprocessing."""
    name = f"{digest[:20]}_{_slug(extractor.name)}_{preprocessing}_v{CACHE_VERSION}.npz"
    return cache_dir(cache) / "references" / name


def reference_statistics(source: str | Path, extractor: FeatureExtractor, *, image_size: int | None = None,
                         keep: tuple[str, ...] = ("pool",), batch_size: int = 100,
                         device: str | torch.device = "cpu", cache: str | Path | None = None,
                         use_cache: bool = True) -> ReferenceStats:
    """Features and statistics of a reference (ADM .npz, any .npz of uint8 images, or a folder) for `extractor`.

    A `.pkl` is EDM2's statistics-only reference (needs image_size; no features, so no precision/recall).
    As the ADM evaluator: if the file has `mu`/`sigma` (`mu_s`/`sigma_s`) made by the same network family
    (ADM's own reference batches: Inception 2015-12-05), those are the pool (spatial) statistics; features
    of `arr_0` are computed for everything else. The result is cached in `<cache>/references/` under
    (content hash, extractor name, preprocessing).
    """
    source = Path(source)
    if not source.exists():
        raise ReferenceError(f"reference {source} not found. ADM's ImageNet references: "
                             "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
                             "<res>/VIRTUAL_imagenet<res>_labeled.npz (512: VIRTUAL_imagenet512.npz)")
    digest = content_hash(source)
    if source.suffix == ".pkl":
        return _pickle_reference(source, digest, extractor, image_size)
    prep = preprocessing_name(source, image_size)
    path = _cache_path(cache, digest, extractor, prep)
    if use_cache and path.is_file():
        cached = _load_cached(path, source)
        if set(keep) <= set(cached.features):
            return cached
    n, batches = _iter_source(source, image_size, batch_size)
    first = next(batches, None)
    if first is None:
        raise ReferenceError(f"reference {source} holds no images")
    resolution = first.shape[1:3]
    moments, features, count = extract(_chain(first, batches), extractor, device, keep)
    stats = {k: (m.mean(), m.cov()) for k, m in moments.items()}
    from_file = _file_stats(source, extractor) if source.is_file() else {}
    stats.update(from_file)
    ref = ReferenceStats(str(source), digest, extractor.name, extractor.family, prep, tuple(resolution), count, stats,
                         features, tuple(sorted(from_file)))
    if use_cache:
        _save_cached(path, ref)
    return ref


def _pickle_reference(source: Path, digest: str, extractor: FeatureExtractor, image_size: int | None) -> ReferenceStats:
    """A statistics-only reference (EDM2 .pkl): FID-type metrics only, no images for precision/recall."""
    if image_size is None:
        raise ReferenceError(f"{source} holds statistics only: give its image_size (the suite's references map)")
    key = EDM2_STAT_KEYS.get(extractor.family)
    stats = read_stats_pickle(source)
    if key not in stats:
        raise ReferenceError(f"{source} has no statistics for {extractor.family} (has {sorted(stats)})")
    return ReferenceStats(str(source), digest, extractor.name, extractor.family, "edm2-stats",
                          (image_size, image_size), 0, {"pool": stats[key]}, {}, ("pool",))


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _file_stats(source: Path, extractor: FeatureExtractor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(source) as f:
        family = str(f["extractor_family"]) if "extractor_family" in f.files else INCEPTION_FAMILY
        if family != extractor.family:
            return {}
        return {key: (f[mu].astype(np.float64), f[sigma].astype(np.float64))
                for key, (mu, sigma) in ADM_STAT_KEYS.items() if mu in f.files and sigma in f.files}


def _save_cached(path: Path, ref: ReferenceStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(ref, k) for k in ("source", "content_hash", "extractor", "family", "preprocessing",
                                         "resolution", "num_images", "stats_from_file")}
    arrays = {"meta": np.asarray(json.dumps(meta))}
    for key, (mu, sigma) in ref.stats.items():
        arrays[f"mu.{key}"], arrays[f"sigma.{key}"] = mu, sigma
    for key, value in ref.features.items():
        arrays[f"features.{key}"] = value
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_cached(path: Path, source: Path) -> ReferenceStats:
    with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        stats = {k[3:]: (f[k], f[f"sigma.{k[3:]}"]) for k in f.files if k.startswith("mu.")}
        features = {k[9:]: f[k] for k in f.files if k.startswith("features.")}
    meta["source"] = str(source)
    meta["resolution"] = tuple(meta["resolution"])
    meta["stats_from_file"] = tuple(meta["stats_from_file"])
    return ReferenceStats(**meta, stats=stats, features=features)
