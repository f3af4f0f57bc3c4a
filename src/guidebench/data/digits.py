"""scikit-learn's digits (UCI optdigits test set: 1,797 grey 8x8 images, 10 classes): a miniature ImageNet.

Pixels are integers v in 0..16. Two views of every image:
    images        float32 [N, 1, 8, 8], v / 8 - 1 in [-1, 1]   (what the networks see)
    images_uint8  uint8   [N, 8, 8, 1], round(v * 255 / 16)    (NHWC, as sample shards; FID input)

Fixed split: numpy.random.RandomState(SPLIT_SEED = 0).permutation(1797) (legacy generator, whose stream
numpy guarantees across versions); its first 1,297 entries are the `train` rows of
`sklearn.datasets.load_digits`, the last 500 the `heldout` rows. Their use in the benchmark:
    train    the diffusion model, the noise-aware classifier and the clean classifier;
    heldout  the evaluation network (the benchmark's Inception) and the FID reference statistics.
The evaluation network's accuracy is therefore measured on `train` images, which it never sees,
and the guidance classifiers' accuracy on `heldout`, which they never see.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

NUM_IMAGES = 1797
NUM_TRAIN = 1297
NUM_HELDOUT = NUM_IMAGES - NUM_TRAIN
NUM_CLASSES = 10
SPLIT_SEED = 0
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class DigitsSplit:
    """One split. `indices` are rows of sklearn.datasets.load_digits()."""

    images: torch.Tensor
    images_uint8: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def split_indices(split: str) -> np.ndarray:
    """Rows of load_digits() in `split` ('train', 'heldout' or 'all'), int64, in permutation order."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {', '.join(SPLITS)}")
    perm = np.random.RandomState(SPLIT_SEED).permutation(NUM_IMAGES).astype(np.int64)
    return {"train": perm[:NUM_TRAIN], "heldout": perm[NUM_TRAIN:], "all": np.arange(NUM_IMAGES)}[split]


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels, labels = data.images.astype(np.int64), data.target.astype(np.int64)
    if pixels.shape != (NUM_IMAGES, 8, 8) or pixels.min() < 0 or pixels.max() > 16:
        raise RuntimeError(f"sklearn.datasets.load_digits returned unexpected data {pixels.shape}; expected "
                           f"({NUM_IMAGES}, 8, 8) integers in 0..16")
    return pixels, labels


def load_digits_split(split: str) -> DigitsSplit:
    """The images, labels and load_digits rows of one split (see the module docstring)."""
    rows = split_indices(split)
    pixels, labels = _raw()
    v = torch.from_numpy(pixels[rows])
    return DigitsSplit(
        images=(v.to(torch.float32) / 8 - 1)[:, None],
        images_uint8=torch.round(v.to(torch.float64) * 255 / 16).to(torch.uint8)[..., None],
        labels=torch.from_numpy(labels[rows]),
        indices=torch.from_numpy(rows),
    )


def save_split_npz(split: str, path: str | Path, num: int | None = None) -> Path:
    """The first `num` images of a split (all if None) as an ADM-format npz (arr_0 uint8 NHWC, arr_1 labels): real
    digits to score as if they were samples, the floor of every digits table."""
    data = load_digits_split(split)
    if num is not None and not 0 < num <= len(data):
        raise ValueError(f"the {split} split has {len(data)} images; cannot take {num}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=data.images_uint8[:num].numpy(), arr_1=data.labels[:num].numpy())
    return path
