"""Off-the-shelf ImageNet classifiers from timm, for guidance methods that classify clean x0 estimates.

Training-free guidance (e.g. Ma et al. 2023, "Elucidating the Design Space of Classifier-Guided
Diffusion Generation", which uses ResNet-50/101) feeds the classifier the denoiser's x0 estimate,
not the noisy x, so the classifier here ignores sigma. Images in [-1, 1] get timm's evaluation
preprocessing as differentiable tensor ops: resize the shorter side to floor(size / crop_pct),
centre crop to size, normalise with the model's mean / std (timm.data.create_transform, eval mode,
at the weights' test resolution).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guidebench.checkpoints import CheckpointError, require_file
from guidebench.classifiers.softplus import swap_relu_for_softplus

_INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


class TimmClassifier(nn.Module):
    """classifier(x, sigma) -> logits [B, K] for clean images x in [-1, 1]; sigma is ignored.

    data_config: timm's resolved data config (input_size, interpolation, mean, std, crop_pct, crop_mode).
    """

    def __init__(self, model: nn.Module, data_config: dict[str, Any]):
        super().__init__()
        if data_config.get("crop_mode", "center") != "center":
            raise ValueError(f"crop_mode {data_config['crop_mode']!r} is not supported; only 'center'")
        if data_config["interpolation"] not in _INTERPOLATION:
            raise ValueError(f"interpolation {data_config['interpolation']!r} is not supported; "
                             f"expected one of {sorted(_INTERPOLATION)}")
        self.model = model.eval().requires_grad_(False)
        self.size = tuple(int(s) for s in data_config["input_size"][1:])
        self.crop_pct = float(data_config["crop_pct"])
        self.interpolation = _INTERPOLATION[data_config["interpolation"]]
        self.register_buffer("mean", torch.tensor(data_config["mean"]).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).reshape(1, -1, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [B, 3, H, W] -> the network's normalised input [B, 3, h, w] (timm eval transform)."""
        x = (x.float() + 1) / 2
        h, w = x.shape[-2:]
        if self.size[0] == self.size[1]:  # torchvision Resize(int): shorter side -> scale, aspect kept
            short = math.floor(self.size[0] / self.crop_pct)
            new = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        else:  # timm ResizeKeepRatio: one ratio so that both sides cover the crop
            ratio = min(h / math.floor(self.size[0] / self.crop_pct), w / math.floor(self.size[1] / self.crop_pct))
            new = (round(h / ratio), round(w / ratio))
        if new != (h, w):
            antialias = self.interpolation != "nearest"
            x = F.interpolate(x, size=new, mode=self.interpolation, align_corners=False if antialias else None,
                              antialias=antialias)
        top, left = round((new[0] - self.size[0]) / 2), round((new[1] - self.size[1]) / 2)
        x = x[..., top:top + self.size[0], left:left + self.size[1]]
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(self.preprocess(x))


def load_classifier(model_name: str = "resnet50.tv2_in1k", checkpoint: str | Path | None = None,
                    use_test_size: bool = True, config_key: str = "classifier.checkpoint",
                    softplus_beta: float | None = None) -> TimmClassifier:
    """timm `model_name` with weights from the local file `checkpoint` (never downloads).

    The file is what timm would download for that name (its pretrained_cfg url, or model.safetensors
    of the Hugging Face repo); timm loads it through pretrained_cfg_overlay=dict(file=...).
    use_test_size: preprocess at the weights' test resolution / crop (e.g. 224 with crop 0.965 for
    the torchvision v2 recipe, as torchvision evaluates them) rather than the training one.
    softplus_beta: EluCD's ReLU -> Softplus(beta) swap (swap_relu_for_softplus: timm's blocks are not
    torchvision BasicBlocks, so every ReLU is swapped); None keeps ReLU. The torchvision_resnet loader
    is EluCD's exact classifier (no preprocessing); this is the timm-name alternative.
    """
    import timm

    if model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ValueError(f"model_name {model_name!r} refers to a remote or directory config; use a timm name "
                         "such as 'resnet50.tv2_in1k' with checkpoint=PATH")
    if checkpoint is None:
        raise CheckpointError(f"classifier {model_name} needs a local weights file (set {config_key}=PATH)")
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config {model_name!r}; list them with timm.list_pretrained()")
    origins = [s for s in (cfg.url, f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else None) if s]
    source = f"the timm weights of {model_name}: " + " or ".join(origins or ["timm.list_pretrained()"])
    path = require_file(checkpoint, source=source, config_key=config_key)
    try:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} does not load into timm {model_name} ({e}). Expected: {source}") from e
    data_config = timm.data.resolve_data_config(model=model, use_test_size=use_test_size)
    return TimmClassifier(swap_relu_for_softplus(model, softplus_beta), data_config)
