"""Per-sample random streams: every sample depends only on its own seed (as EDM's generate.py)."""

from __future__ import annotations

from typing import Sequence

import torch


class StackedRandomGenerator:
    """One torch.Generator per sample; draws are stacked along the batch dimension.

    Sample k's noise, label and sampler noise come from generator k alone, so an image does not
    change with the batch size, the batch it falls in or the number of processes. Seeds are taken
    modulo 2^32, as in EDM's generate.py, so the same seed gives EDM's latents.
    """

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, *shape[1:]] standard normal; shape[0] must equal the number of seeds."""
        if shape[0] != len(self.generators):
            raise ValueError(f"asked for {shape[0]} draws from {len(self.generators)} generators")
        return torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype)

    def randint(self, high: int, size: Sequence[int]) -> torch.Tensor:
        """[B, *size[1:]] integers in [0, high), int64."""
        if size[0] != len(self.generators):
            raise ValueError(f"asked for {size[0]} draws from {len(self.generators)} generators")
        return torch.stack(
            [torch.randint(high, tuple(size[1:]), generator=g, device=self.device) for g in self.generators]
        )
