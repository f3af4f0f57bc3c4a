"""Shared fixtures: composed Hydra configs for the CLI functions, shrunk to test size."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from guidebench.config import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(config_name, overrides) -> a resolved-ready config whose outputs go under tmp_path."""

    def _compose(config_name: str, overrides: list[str] = ()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=[f"hydra.run.dir={tmp_path}", *overrides],
                          return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        cfg.paths.output_dir = str(tmp_path)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
