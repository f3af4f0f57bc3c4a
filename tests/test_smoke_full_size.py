"""Released-size ADM-64 and DiT-XL/2 (random weights, 2 steps) through sampling, shards and the ADM suite.

The checkpoints are written in the released formats (plain state dicts; a diffusers AutoencoderKL folder
with sd-vae-ft-ema's architecture), loaded by the backbone configs, and the samples are scored with the
real Inception network (`metrics=fast`) against a reference batch the test writes.
"""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from guidebench.backbones.adm import create_unet
from guidebench.backbones.dit import DiT, architecture
from guidebench.cli.run import run
from guidebench.shards import list_shards, read_shard

pytestmark = pytest.mark.slow


def reference_npz(path, size, n=16):
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # k-NN needs > 3
    np.savez(path, arr_0=images)
    return path


def run_smoke(compose_cfg, tmp_path, overrides, size):
    ref = reference_npz(tmp_path / "ref.npz", size)
    cfg = compose_cfg("run", [*overrides, "guidance.scale=1.5" if "guidance=cfg_dit" in overrides else "guidance=none",
                              "sampler=ddim", "sampler.schedule.respacing=ddim2", "sampling.num_samples=4",
                              "sampling.batch_size=4", "sampling.device=cpu", "metrics=fast",
                              f"evaluation.reference={ref}", f"evaluation.cache_dir={tmp_path / 'cache'}"])
    metrics = run(cfg)
    shards = [read_shard(p) for p in list_shards(tmp_path)]
    assert shards[0]["arr_0"].shape == (4, size, size, 3) and shards[0]["arr_0"].dtype == np.uint8
    assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["sfid"])
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == 4
    return metrics


def test_adm_64_released_architecture(compose_cfg, tmp_path):
    cfg = compose_cfg("run", ["backbone=adm_64"])
    flags = {k: v for k, v in OmegaConf.to_container(cfg.backbone.denoiser).items()
             if k not in ("_target_", "checkpoint", "dtype", "clip_x0", "sha256")}
    torch.save(create_unet(flags).state_dict(), tmp_path / "64x64_diffusion.pt")
    run_smoke(compose_cfg, tmp_path, ["backbone=adm_64", f"backbone.denoiser.checkpoint={tmp_path / '64x64_diffusion.pt'}",
                                      "backbone.denoiser.dtype=float32"], 64)


def test_dit_xl_2_released_architecture(compose_cfg, tmp_path):
    from diffusers import AutoencoderKL

    torch.save(DiT(**architecture("DiT-XL/2", 256)).state_dict(), tmp_path / "DiT-XL-2-256x256.pt")
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=256, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)  # sd-vae-ft-ema's architecture
    vae.save_pretrained(tmp_path / "sd-vae-ft-ema")
    run_smoke(compose_cfg, tmp_path, ["backbone=dit_xl_2_256", f"backbone.denoiser.checkpoint={tmp_path / 'DiT-XL-2-256x256.pt'}",
                                      f"backbone.decoder.path={tmp_path / 'sd-vae-ft-ema'}", "guidance=cfg_dit"], 256)
