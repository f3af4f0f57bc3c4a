"""guidebench's evaluation networks as torch-fidelity feature extractors.

torch-fidelity computes FID (Heusel et al. 2017), IS (Salimans et al. 2016), precision/recall
(Kynkaanniemi et al. 2019) and KID (Binkowski et al. 2018) in the feature space of a registered extractor.
`register_evalnet(name, loader)` registers a classifier `net(images_uint8 [B, C, H, W]) -> {"features":
[B, D], "logits": [B, K]}` built by `loader(checkpoint)`; `calculate_metrics(feature_extractor=name,
feature_extractor_weights_path=checkpoint, ...)` then uses `features` for FID/PRC/KID and the logits, as
`logits_unbiased`, for IS (torch-fidelity's name for pre-softmax logits). Features are returned in float64
so torch-fidelity's statistics are computed in double precision.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

Loader = Callable[[str], nn.Module]


class EvalNetExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around a guidebench evaluation network; `loader` is set per registered name."""

    loader: ClassVar[Loader]

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name!r} needs its checkpoint: pass feature_extractor_weights_path")
        self.net = type(self).loader(str(feature_extractor_weights_path))

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits_unbiased" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> None:
        return None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(images)
        out = {"features": out["features"], "logits_unbiased": out["logits"]}
        return tuple(out[name].to(torch.float64) for name in self.features_list)


def register_evalnet(name: str, loader: Loader) -> type[EvalNetExtractor]:
    """Register `loader(checkpoint) -> net` with torch-fidelity as feature extractor `name` (idempotent)."""
    known = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if known is not None:
        if issubclass(known, EvalNetExtractor) and known.loader is loader:
            return known
        raise ValueError(f"torch-fidelity already has a different feature extractor named {name!r}")
    cls = type(f"EvalNetExtractor_{name}", (EvalNetExtractor,), {"loader": staticmethod(loader)})
    register_feature_extractor(name, cls)
    return cls


def _load_digits_evalnet(checkpoint: str) -> nn.Module:
    from guidebench.evaluation.digits_evalnet import load_evalnet

    return load_evalnet(checkpoint)


register_evalnet("digits-evalnet", _load_digits_evalnet)
