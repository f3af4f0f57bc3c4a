"""How the networks run on an accelerator: autocast dtype, TF32 and torch.compile (`sampling.dtype`, `.tf32`,
`.compile`). Only the denoiser networks change; the solver's maths stays float64 and classifiers (whose
gradients steer guidance) stay float32.
"""

from __future__ import annotations

import torch
from torch import nn

from guidebench.denoisers.base import Denoiser

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastNetwork(nn.Module):
    """`net` under torch.autocast(dtype): matmuls and convolutions in dtype, reductions and norms in float32
    (autocast's op lists); other attributes are `net`'s, so module paths, hooks and `.net` walks still find it."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.net(x, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


def network_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"sampling.dtype={name} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (off: full float32, PyTorch's matmul default)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def configure_networks(modules, dtype: str = "fp32", compile: bool = False) -> None:
    """For each denoiser among `modules` (the backbone's, a guide model a guidance method holds), run its
    network (`denoiser.net`) under autocast(dtype) unless fp32, and torch.compile it in place if `compile`."""
    target = network_dtype(dtype)
    for denoiser in modules:
        if not isinstance(denoiser, Denoiser) or not isinstance(getattr(denoiser, "net", None), nn.Module):
            continue
        if compile:
            denoiser.net.compile()
        if target != torch.float32:
            denoiser.net = AutocastNetwork(denoiser.net, target)
