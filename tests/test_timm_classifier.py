"""timm classifiers loaded offline from a local file, against timm's own model + eval transform."""

import pytest
import torch

from guidebench.checkpoints import CheckpointError
from guidebench.classifiers.timm_classifier import load_classifier

timm = pytest.importorskip("timm")


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt of timm to fetch weights fails the test."""
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("timm tried to download weights")

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(builder, name, refuse)


def random_weights(name, path, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    torch.save(model.state_dict(), path)
    return model.eval()


def images(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", ["resnet18.tv_in1k", "resnet18.a1_in1k"])  # bilinear 224/0.875; bicubic 288/1.0
@pytest.mark.parametrize("shape", [(2, 3, 256, 256), (1, 3, 64, 96), (1, 3, 320, 352)])
def test_logits_equal_timm_model_with_timm_eval_transform(name, shape, tmp_path, no_download):
    ref = random_weights(name, tmp_path / "w.pth")
    clf = load_classifier(name, tmp_path / "w.pth")
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ref, use_test_size=True))
    x = images(shape)
    with torch.no_grad():
        expected = ref(torch.stack([transform((img + 1) / 2) for img in x]))
        out = clf(x, torch.full((len(x),), 3.0))
    assert out.shape == (len(x), 1000)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(clf(x, None), out)  # sigma is ignored: x is a clean x0 estimate


def test_classifier_is_differentiable_in_x(tmp_path, no_download):
    random_weights("resnet18.tv_in1k", tmp_path / "w.pth")
    clf = load_classifier("resnet18.tv_in1k", tmp_path / "w.pth")
    x = images((2, 3, 64, 64)).requires_grad_(True)
    torch.log_softmax(clf(x, None), -1)[:, 7].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in clf.parameters())


def test_missing_or_wrong_file_is_a_clear_error(tmp_path, no_download):
    with pytest.raises(CheckpointError, match=r"missing file .*resnet50\.pth.*download\.pytorch\.org/models/resnet50-11ad3fa6\.pth"):
        load_classifier("resnet50.tv2_in1k", tmp_path / "resnet50.pth")
    random_weights("resnet18.tv_in1k", tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"r18\.pth does not load into timm resnet34\.tv_in1k"):
        load_classifier("resnet34.tv_in1k", tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="remote"):
        load_classifier("hf-hub:timm/resnet50.tv2_in1k", tmp_path / "r18.pth")
