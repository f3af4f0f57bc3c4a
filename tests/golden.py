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
