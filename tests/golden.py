"""Where the golden fixtures live: $GUIDEBENCH_GOLDEN, else ../shared/golden/public beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    return Path(os.environ.get("GUIDEBENCH_GOLDEN", REPO.parent / "shared" / "golden" / "public"))


def golden_path(name: str) -> Path:
    path = golden_dir() / name
    if not path.exists():
        pytest.skip(f"golden fixture {path} not found (set GUIDEBENCH_GOLDEN)")
    return path


def load_golden(name: str) -> dict:
    return torch.load(golden_path(name), map_location="cpu", weights_only=True)



def elucd_fixture_resnet(g: dict) -> torch.nn.Module:
    """The stand-in ResNet of elucd_classifier.pt, unloaded: torchvision's ResNet with a Bottleneck of expansion 1
    (still a Bottleneck for EluCD's swap rule), built from `fixture_arch`."""
    from torchvision.models.resnet import Bottleneck, ResNet

    class Bottleneck1(Bottleneck):
        expansion = 1

    arch = g["fixture_arch"]
    assert (arch["constructor"], arch["block"]) == ("torchvision.models.resnet.ResNet", "Bottleneck1")
    keys = ("num_classes", "zero_init_residual", "groups", "width_per_group", "replace_stride_with_dilation",
            "norm_layer")
    return ResNet(Bottleneck1, arch["layers"], **{k: arch[k] for k in keys})
