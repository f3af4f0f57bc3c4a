"""Sample sources for evaluation: run or shard folders, ADM-format npz files, image folders.

`open_source(path)` returns a map-style torch Dataset of uint8 [C, H, W] tensors (torch-fidelity's input
convention) with per-sample `labels` (int64 numpy array, or None when the source has none), `nonfinite`
(samples a sampling run dropped for NaN/inf) and `files` (what the content hash covers).
`open_samples(path)` is what the evaluator scores: a run folder only if it holds exactly the set its
run.json lists (guidebench.manifest), with `complete` and `requested` set; other sources as they are.

Streaming: images are read one part at a time -- one shard, `chunk` rows of an npz's `arr_0` (read from
the zip member, never the whole array), or one image file -- and a source holds at most ONE part in
memory. Reading in index order (a DataLoader without shuffling or worker processes, as the evaluator
uses it) reads every part once; random access is correct but re-reads parts.
"""

from __future__ import annotations

import bisect
import logging
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from guidebench.manifest import IncompleteRunError, check_run, run_folder
from guidebench.shards import ShardError, list_shards, read_shard

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A sample source is unreadable, of mixed resolution, or does not fit the source it is compared with."""


class SampleSource(Dataset):
    """uint8 [C, H, W] images of consecutive parts; subclasses list part sizes and load one part (NHWC).

    complete / requested: whether a run's scored shards are its whole requested set, and its size (None
    for sources that are not checked runs, such as an ADM npz or an image folder).
    """

    complete: bool | None = None
    requested: int | None = None

    def __init__(self, path: Path, part_sizes: list[int], shape: tuple[int, int, int], files: list[Path],
                 labels: np.ndarray | None = None, nonfinite: int = 0):
        self.path, self.shape, self.files = path, shape, files
        self.labels, self.nonfinite = labels, nonfinite
        self.starts = np.concatenate([[0], np.cumsum(part_sizes)]).astype(np.int64).tolist()
        self._part: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples of {self.path}")
        k = bisect.bisect_right(self.starts, i) - 1
        if self._part is None or self._part[0] != k:
            self._part = None  # drop the current part before reading the next
            self._part = (k, self.load_part(k))
        # a copy, so a returned sample never keeps its part alive
        return torch.from_numpy(self._part[1][i - self.starts[k]].transpose(2, 0, 1).copy())

    def load_part(self, k: int) -> np.ndarray:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_part": None}


class ShardSource(SampleSource):
    """A guidebench run folder (or its shards/ subfolder), or the shard `files` given; labels and sizes come
    from the shards' headers."""

    def __init__(self, path: str | Path, files: list[Path] | None = None):
        path = Path(path)
        self.shard_paths = list_shards(path) if files is None else list(files)
        if not self.shard_paths:
            raise ShardError(f"no shard-*.npz files in {path}; sample into it first (guidebench-sample)")
        sizes, labels, nonfinite, shape = [], [], 0, None
        for shard in self.shard_paths:
            try:
                with np.load(shard) as f:
                    header, lab, dropped = npz_header(f.zip, "arr_0"), f["arr_1"], f.get("nonfinite", ())
            except Exception as e:
                raise ShardError(f"corrupt shard {shard}: {e}. Re-run the sampling call to regenerate it.") from e
            shape = _same_shape(shape, header, shard, path)
            sizes.append(header[0][0])
            labels.append(lab)
            nonfinite += len(dropped)
        super().__init__(path, sizes, shape, self.shard_paths, np.concatenate(labels).astype(np.int64), nonfinite)

    def load_part(self, k: int) -> np.ndarray:
        images = read_shard(self.shard_paths[k])["arr_0"]
        if len(images) != self.starts[k + 1] - self.starts[k]:
            raise ShardError(f"shard {self.shard_paths[k]} changed while it was being evaluated")
        return images


class NpzSource(SampleSource):
    """An ADM-evaluator npz: `arr_0` uint8 [N, H, W, C], optional `arr_1` labels; read `chunk` rows at a time."""

    def __init__(self, path: str | Path, chunk: int = 1000):
        path = Path(path)
        self._stream, self._next_row = None, 0
        try:
            with np.load(path) as f:
                (n, *hwc), dtype, self._offset = npz_header(f.zip, "arr_0", with_offset=True)
                labels = f["arr_1"].astype(np.int64) if "arr_1" in f.files else None
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"cannot read {path} as an npz with arr_0 uint8 [N, H, W, C] images: {e}") from e
        if dtype != np.uint8 or len(hwc) != 3:
            raise SourceError(f"{path}: arr_0 is {dtype} {tuple([n, *hwc])}; expected uint8 [N, H, W, C] images")
        if labels is not None and labels.shape != (n,):
            raise SourceError(f"{path}: arr_1 has shape {labels.shape}; expected one label per image ({n},)")
        self.chunk, self._row_bytes = chunk, int(np.prod(hwc))
        sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
        super().__init__(path, sizes, (hwc[2], hwc[0], hwc[1]), [path], labels)

    def load_part(self, k: int) -> np.ndarray:
        start, stop = self.starts[k], self.starts[k + 1]
        if self._stream is None or self._next_row != start:
            self._close()
            self._zip = zipfile.ZipFile(self.path)
            self._stream = self._zip.open("arr_0.npy")
            self._stream.seek(self._offset + start * self._row_bytes)
        size = (stop - start) * self._row_bytes
        data = self._stream.read(size)
        if len(data) != size:
            raise SourceError(f"{self.path} is truncated: arr_0 ends before row {stop}")
        self._next_row = stop
        c, h, w = self.shape
        return np.frombuffer(data, dtype=np.uint8).reshape(stop - start, h, w, c)

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._zip.close()
        self._stream, self._next_row = None, 0

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_stream": None, "_zip": None, "_next_row": 0}

    def __del__(self) -> None:
        self._close()


class ImageFolderSource(SampleSource):
    """PNG/JPEG files directly in a folder, in name order: 1 channel if all are greyscale (mode L), else RGB."""

    def __init__(self, path: str | Path):
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise SourceError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {path}")
        shape, grey = None, True
        for file in files:
            try:
                with Image.open(file) as im:
                    header, grey = ((1, im.height, im.width, 1), np.dtype(np.uint8)), grey and im.mode == "L"
            except Exception as e:
                raise SourceError(f"cannot read image {file}: {e}") from e
            shape = _same_shape(shape, header, file, path)
        super().__init__(path, [1] * len(files), (1 if grey else 3, *shape[1:]), files)

    def load_part(self, k: int) -> np.ndarray:
        with Image.open(self.files[k]) as im:
            image = np.asarray(im.convert("L" if self.shape[0] == 1 else "RGB"), dtype=np.uint8)
        return image.reshape(1, *image.shape[:2], self.shape[0])


def open_source(path: str | Path) -> SampleSource:
    """The source at `path`: a run or shard folder, an ADM-format .npz, or a folder of PNG/JPEG images."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".npz":
        return NpzSource(path)
    if path.is_dir():
        if (path / "shards").is_dir() or any(path.glob("shard-*.npz")):
            return ShardSource(path)
        return ImageFolderSource(path)
    raise SourceError(f"no samples at {path}: expected a run folder (with shards/), a shard folder, an ADM .npz "
                      f"(arr_0 uint8 NHWC) or a folder of {'/'.join(IMAGE_EXTENSIONS)} images")


def open_samples(path: str | Path, allow_incomplete: bool = False) -> SampleSource:
    """The samples to score. A run folder must hold exactly the set its run.json lists, else IncompleteRunError
    names what is missing and the command that completes it; with allow_incomplete its verified shards are
    scored (`complete` False if they are not all of it). Other sources are scored as they are."""
    path = Path(path).expanduser()
    if not (path.is_dir() and ((path / "shards").is_dir() or any(path.glob("shard-*.npz")))):
        return open_source(path)
    run = run_folder(path)
    if not (run / "run.json").is_file():
        if not allow_incomplete:
            raise IncompleteRunError(
                f"{path} holds shard files but no run.json manifest, so nothing shows the set is complete; refusing "
                "to score it. Re-run the guidebench-sample call that made it with sampling.out_dir="
                f"{run} (it writes the manifest), or score the shards as they are with "
                "evaluation.allow_incomplete=true")
        log.warning("%s has no run.json manifest; scoring its shards as they are (complete: false)", path)
        source = ShardSource(path)
        source.complete = False
        return source
    coverage = check_run(run)
    if not coverage.clean:
        if not allow_incomplete:
            raise IncompleteRunError(coverage.message())
        if not coverage.valid:
            raise IncompleteRunError(f"{run} has no verified shard to score:\n  " + "\n  ".join(coverage.problems()))
        log.warning("scoring the verified shards of %s only (evaluation.allow_incomplete=true):\n  %s", run,
                    "\n  ".join(coverage.problems()))
    source = ShardSource(run, coverage.valid)
    source.complete, source.requested = coverage.complete, coverage.manifest["num_samples"]
    return source


def check_compatible(samples: SampleSource, reference: SampleSource) -> None:
    """Refuse to compare sources whose images differ in resolution (channels are the extractor's business)."""
    if samples.shape[1:] != reference.shape[1:]:
        raise SourceError(f"samples {samples.path} are {_fmt(samples.shape)} but the reference {reference.path} is "
                          f"{_fmt(reference.shape)}; compare samples with a reference of the same resolution")


def npz_header(zf: zipfile.ZipFile, key: str, with_offset: bool = False) -> tuple:
    """(shape, dtype[, data offset]) of array `key` in an open npz, read from its .npy header only."""
    with zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
        if fortran_order and len(shape) > 1:
            raise SourceError(f"{zf.filename}: {key} is stored in Fortran order; save it C-contiguous")
        return (shape, dtype, f.tell()) if with_offset else (shape, dtype)


def _same_shape(shape: tuple | None, header: tuple, file: Path, source: Path) -> tuple[int, int, int]:
    (_, *hwc), dtype = header
    if dtype != np.uint8 or len(hwc) != 3:
        raise SourceError(f"{file} holds {dtype} {tuple(hwc)} images; expected uint8 [H, W, C]")
    this = (hwc[2], hwc[0], hwc[1])
    if shape is not None and this != shape:
        raise SourceError(f"{source} mixes image shapes: {file} is {_fmt(this)} but earlier images are {_fmt(shape)}")
    return this


def _fmt(shape: tuple[int, int, int]) -> str:
    return f"{shape[1]}x{shape[2]} with {shape[0]} channel{'s' if shape[0] != 1 else ''}"


def _digits_heldout() -> tuple[np.ndarray, np.ndarray]:
    from guidebench.data.digits import load_digits_split

    split = load_digits_split("heldout")
    return split.images_uint8.numpy(), split.labels.numpy()


# Symbolic references: name -> function returning (uint8 [N, H, W, C] images, int64 [N] labels).
REFERENCES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"digits-heldout": _digits_heldout}


def reference_path(reference: str | Path, cache_dir: str | Path) -> Path:
    """A reference's path: itself if it exists, else a registered name materialised as cache_dir/references/NAME.npz.

    A materialised reference is written once; delete the file to rebuild it.
    """
    if Path(reference).expanduser().exists():
        return Path(reference).expanduser()
    if str(reference) not in REFERENCES:
        raise SourceError(f"reference {reference!r} is neither an existing path nor a registered reference "
                          f"({', '.join(REFERENCES)})")
    path = Path(cache_dir).expanduser() / "references" / f"{reference}.npz"
    if not path.exists():
        images, labels = REFERENCES[str(reference)]()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, arr_0=images, arr_1=labels)
        tmp.replace(path)
    return path
