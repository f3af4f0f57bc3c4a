"""Where guidebench's configs live, and the OmegaConf resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"

OmegaConf.register_new_resolver("guidebench_root", lambda: str(REPO_ROOT), replace=True)
