"""Datasets guidebench trains its own small models on."""

from guidebench.data.digits import DigitsSplit, load_digits_split, split_indices

__all__ = ["DigitsSplit", "load_digits_split", "split_indices"]
