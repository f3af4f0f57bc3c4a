"""Turn seeds into images: latents and labels from each sample's own seed, one solver call, decoding."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from guidebench.denoisers.base import Denoiser
from guidebench.guidance.base import Guidance, NoGuidance
from guidebench.rng import StackedRandomGenerator


def to_uint8(x: torch.Tensor, rule: str = "adm") -> np.ndarray:
    """Images in [-1, 1], [B, C, H, W] -> uint8 NHWC, by the rule of the code whose numbers we reproduce.

    adm: (x + 1) * 127.5 clamped and truncated (guided-diffusion, DiT);
    edm: x * 127.5 + 128 clamped and truncated, i.e. rounded (NVlabs/edm generate.py, DiT sample_ddp.py);
    edm2_vae: 255 y truncated for the VAE output y = (x + 1) / 2 in [0, 1], taken back to float32 from float64
    images (NVlabs/edm2 training/encoders.py StabilityVAEEncoder.decode; `VAEDecoder` with pixel_range (0, 1)).
    """
    if rule == "adm":
        x = (x.to(torch.float32) + 1) * 127.5
    elif rule == "edm":
        x = x.to(torch.float32) * 127.5 + 128
    elif rule == "edm2_vae":
        x = ((x.to(torch.float64) + 1) / 2).to(torch.float32) * 255
    else:
        raise ValueError(f"unknown uint8 rule {rule!r}; expected 'adm', 'edm' or 'edm2_vae'")
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class CountingDenoiser:
    """A denoiser that counts the rows it evaluates: a batched CFG forward of 2B rows counts 2 per sample,
    and a row whose input requires grad counts 2, its forward and the backward through it
    (methods that differentiate through the denoiser: DPS, FreeDoM, DOODL)."""

    def __init__(self, denoiser):
        self.denoiser, self.rows = denoiser, 0

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        self.rows += x.shape[0] * (2 if torch.is_grad_enabled() and x.requires_grad else 1)
        return self.denoiser(x, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)


class GuidanceNetworkCounter:
    """Counts, inside a `with` block, the rows evaluated by the networks a guidance method holds: its
    `classifier`, and any other denoiser (autoguidance's guide model), through forward pre-hooks."""

    def __init__(self, guidance: Guidance, denoiser):
        self.rows = {"classifier": 0, "denoiser": 0}
        self._watched = [(module, "classifier" if key == "classifier" else "denoiser")
                         for key, module in vars(guidance).items()
                         if isinstance(module, torch.nn.Module) and module is not denoiser
                         and (key == "classifier" or isinstance(module, Denoiser))]
        self._hooks: list = []

    def _counter(self, kind: str):
        def count(module, args, kwargs) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            self.rows[kind] += len(x) * (2 if kind == "denoiser" and torch.is_grad_enabled() and x.requires_grad else 1)
        return count

    def __enter__(self) -> "GuidanceNetworkCounter":
        self._hooks = [module.register_forward_pre_hook(self._counter(kind), with_kwargs=True)
                       for module, kind in self._watched]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def start_scale(denoiser, sigmas: torch.Tensor) -> torch.Tensor:
    """The factor from standard-normal latents to the start x at sigmas[0]: sqrt(1 + sigma_0^2) for VP models
    (x_T ~ N(0, I) in VP coordinates), sigma_0 otherwise."""
    return (1 + sigmas[0] ** 2).sqrt() if getattr(denoiser, "variance_preserving", False) else sigmas[0]


@torch.no_grad()
def generate(denoiser, solver: Callable, sigmas: torch.Tensor, seeds: Sequence[int], *,
             num_classes: int, guidance: Guidance | None = None, decoder: Callable | None = None,
             device: torch.device | str = "cpu", uint8_rule: str = "adm") -> dict[str, np.ndarray]:
    """Sample one image per seed.

    RNG per seed (EDM generate.py order): latents randn([C, R, R]), then the label randint(num_classes),
    then whatever the solver (or the method's `solve`) draws. The start is x = latents * `start_scale`:
    sqrt(1 + sigma_0^2) for VP models (x_T ~ N(0, I) in VP coordinates) and sigma_0 otherwise.
    Returns images (uint8 NHWC; non-finite samples dropped), labels (int64, -1 without classes),
    the kept positions `kept` and the positions of non-finite samples `nonfinite`, and the cost per sample:
    `nfe`, denoiser evaluations (rows through the denoiser, so CFG's batched forward counts 2, a forward
    differentiated through counts 2 more, plus those of a guide model the method holds), and `classifier_nfe`, evaluations of the method's classifier
    (each with its backward pass for the gradient; 0 without a classifier).
    """
    rng = StackedRandomGenerator(device, seeds)
    n = len(seeds)
    latents = rng.randn([n, denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution])
    labels = rng.randint(num_classes, size=[n]) if num_classes > 0 else None
    sigmas = sigmas.to(device)
    guidance = guidance or NoGuidance()
    counted = CountingDenoiser(denoiser)
    with GuidanceNetworkCounter(guidance, denoiser) as networks:
        x = guidance.solve(solver, counted, latents.to(torch.float64) * start_scale(denoiser, sigmas), sigmas, labels,
                           rng=rng)
    if decoder is not None:
        x = decoder(x.to(torch.float32))
    finite = torch.isfinite(x.reshape(n, -1)).all(dim=1).cpu().numpy()
    images = to_uint8(torch.nan_to_num(x), uint8_rule)
    labels_np = labels.cpu().numpy() if labels is not None else np.full(n, -1, dtype=np.int64)
    return {"images": images[finite], "labels": labels_np[finite],
            "kept": np.flatnonzero(finite), "nonfinite": np.flatnonzero(~finite),
            "nfe": (counted.rows + networks.rows["denoiser"]) / n, "classifier_nfe": networks.rows["classifier"] / n}
