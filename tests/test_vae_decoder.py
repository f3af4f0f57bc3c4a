"""The DiT VAE decoder stage on a tiny random AutoencoderKL saved as a diffusers folder."""

import json

import pytest
import torch

from guidebench.backbones.vae import load_decoder
from guidebench.checkpoints import CheckpointError

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(  # 3 downsampling stages: factor 8, 4 latent channels, like sd-vae-ft-*
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    ).eval()
    folder = tmp_path_factory.mktemp("vae") / "sd-vae-ft-ema"
    vae.save_pretrained(folder)
    return folder, vae


def test_decoder_is_vae_decode_of_unscaled_latents_clamped(vae_folder):
    folder, vae = vae_folder
    decoder = load_decoder(folder)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    with torch.no_grad():
        images = decoder(z)
        expected = vae.decode(z.float() / 0.18215).sample.clamp(-1, 1)
        other = load_decoder(folder, scale=1.0)(z)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    assert images.min() >= -1 and images.max() <= 1
    assert not torch.allclose(images, other, atol=1e-3)  # the scale is applied


def test_decoder_passes_gradients_to_latents(vae_folder):
    decoder = load_decoder(vae_folder[0])
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    (decoder(z) * 0.01).sum().backward()
    assert z.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in decoder.parameters())


def test_missing_or_wrong_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "vae" / "sd-vae-ft-mse"
    with pytest.raises(CheckpointError, match=r"missing VAE folder .*sd-vae-ft-mse.*huggingface\.co/stabilityai/sd-vae-ft-mse"):
        load_decoder(missing)
    missing.mkdir(parents=True)
    (missing / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="UNet2DModel, not an AutoencoderKL"):
        load_decoder(missing)
