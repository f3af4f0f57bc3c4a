"""Released-size ADM-64 and DiT-XL/2 (random weights, 2 steps) through sampling, shards and the ADM suite.

The checkpoints are written in the released formats by tests/released_formats.py (plain state dicts; a
diffusers AutoencoderKL folder with sd-vae-ft-ema's architecture) from the backbone configs' own flags, loaded
by the backbone configs, and the samples are scored with the real Inception network (`metrics=fast`) against a
reference batch the test writes. tests/test_experiments_smoke.py does the same for every experiment.
"""

import json

import numpy as np
import pytest

from guidebench.cli.run import run
from guidebench.shards import list_shards, read_shard
from tests.released_formats import ReleasedCheckpoints, reference_npz

pytestmark = pytest.mark.slow


def run_smoke(compose_cfg, tmp_path, overrides, size):
    ref = reference_npz(tmp_path / "ref.npz", size)  # 16 images: k-NN (k = 3) needs > 3
    cfg = compose_cfg("run", [*overrides, "guidance.scale=1.5" if "guidance=cfg_dit" in overrides else "guidance=none",
                              "sampler=ddim", "sampler.schedule.respacing=ddim2", "sampling.num_samples=4",
                              "sampling.batch_size=4", "sampling.device=cpu", "metrics=fast",
                              f"evaluation.reference={ref}", f"evaluation.cache_dir={tmp_path / 'cache'}"])
    written = ReleasedCheckpoints(tmp_path / "released").point(cfg)
    assert "backbone.denoiser.checkpoint" in written
    metrics = run(cfg)
    shards = [read_shard(p) for p in list_shards(tmp_path)]
    assert shards[0]["arr_0"].shape == (4, size, size, 3) and shards[0]["arr_0"].dtype == np.uint8
    assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["sfid"])
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == 4
    return metrics


def test_adm_64_released_architecture(compose_cfg, tmp_path):
    run_smoke(compose_cfg, tmp_path, ["backbone=adm_64", "backbone.denoiser.dtype=float32"], 64)


def test_dit_xl_2_released_architecture(compose_cfg, tmp_path):
    run_smoke(compose_cfg, tmp_path, ["backbone=dit_xl_2_256", "guidance=cfg_dit"], 256)
