"""Per-seed generation, the shard writer and reader, export to the ADM npz format."""

import numpy as np
import pytest
import torch

from guidebench.generate import generate
from guidebench.guidance import ClassifierFreeGuidance
from guidebench.samplers import sample_ddpm
from guidebench.schedules import sigmas_respaced
from guidebench.shards import ShardError, ShardWriter, export_npz, list_shards, read_shard
from tests.analytic import gaussian_vp

MUS = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5


def run(seeds, **kw):
    den = gaussian_vp(MUS, s=0.3)
    return generate(den, sample_ddpm, sigmas_respaced(den, "20"), seeds, num_classes=3,
                    guidance=ClassifierFreeGuidance(1.5), **kw)


def test_samples_depend_only_on_their_seed():
    seeds = list(range(100, 107))
    whole = run(seeds)
    singles = [run([s]) for s in seeds]
    assert np.array_equal(whole["images"], np.concatenate([o["images"] for o in singles]))
    assert np.array_equal(whole["labels"], np.concatenate([o["labels"] for o in singles]))
    shifted = run(seeds[3:])
    assert np.array_equal(whole["images"][3:], shifted["images"])
    assert whole["images"].dtype == np.uint8 and whole["images"].shape == (7, 4, 4, 1)
    assert not np.array_equal(whole["images"][0], whole["images"][1])


def shard(n, start=0):
    rng = np.random.default_rng(start)
    return dict(images=rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8), labels=rng.integers(0, 3, n),
                indices=np.arange(start, start + n), seeds=np.arange(start, start + n) + 7)


def writer(path, fingerprint, num_samples=8, shard_size=5, **kw):
    return ShardWriter(path, fingerprint, num_samples=num_samples, shard_size=shard_size).prepare(**kw)


def test_shard_round_trip_and_export(tmp_path):
    w = writer(tmp_path, {"guidance": "cfg", "scale": 2.0})
    a, b = shard(5), shard(3, start=5)
    w.write(1, **b)
    w.write(0, **a)
    assert [p.name for p in list_shards(tmp_path)] == ["shard-000000.npz", "shard-000001.npz"]
    got = read_shard(list_shards(tmp_path)[0])
    assert np.array_equal(got["arr_0"], a["images"]) and np.array_equal(got["seeds"], a["seeds"])
    assert got["arr_1"].dtype == np.int64 and len(got["nonfinite"]) == 0
    merged = np.load(export_npz(tmp_path, tmp_path / "all.npz"))
    assert np.array_equal(merged["arr_0"], np.concatenate([a["images"], b["images"]]))
    assert np.array_equal(merged["arr_1"], np.concatenate([a["labels"], b["labels"]]))


def test_writer_refuses_to_mix_configurations(tmp_path):
    writer(tmp_path, {"guidance": "cfg", "scale": 2.0}, 4).write(0, **shard(4))
    assert writer(tmp_path, {"guidance": "cfg", "scale": 2.0}, 4).done(0)  # same config resumes
    with pytest.raises(ShardError, match="scale"):
        writer(tmp_path, {"guidance": "cfg", "scale": 4.0}, 4)
    assert list_shards(tmp_path)  # nothing was deleted
    writer(tmp_path, {"guidance": "cfg", "scale": 4.0}, 4, overwrite=True)
    assert not list_shards(tmp_path)


def test_corrupt_or_inconsistent_shard_is_named(tmp_path):
    w = writer(tmp_path, {"guidance": "none"}, 4)
    path = w.write(0, **shard(4))
    assert w.done(0)
    path.write_bytes(path.read_bytes()[:100])
    assert not w.done(0)
    with pytest.raises(ShardError, match="shard-000000.npz"):
        read_shard(path)
    np.savez(tmp_path / "shards" / "shard-000002.npz", arr_0=np.zeros((3, 4, 4, 1), np.uint8),
             arr_1=np.zeros(2, np.int64), indices=np.arange(3), seeds=np.arange(3))
    with pytest.raises(ShardError, match="inconsistent"):
        read_shard(tmp_path / "shards" / "shard-000002.npz")


def test_nonfinite_samples_are_dropped_and_reported():
    class Exploding(torch.nn.Module):
        def __init__(self, den):
            super().__init__()
            self.den = den
            for k in ("img_channels", "img_resolution", "num_classes", "null_label", "sigma_min", "sigma_max",
                      "variance_preserving", "sigmas"):
                setattr(self, k, getattr(den, k))

        def round_sigma(self, s):
            return self.den.round_sigma(s)

        def forward(self, x, sigma, labels):
            out = self.den(x, sigma, labels)
            bad = (labels == 1).reshape(-1, 1, 1, 1)
            return out._replace(x0=torch.where(bad, torch.full_like(out.x0, float("nan")), out.x0))

    den = Exploding(gaussian_vp(MUS))
    out = generate(den, sample_ddpm, sigmas_respaced(den, "10"), list(range(12)), num_classes=3)
    full = generate(den.den, sample_ddpm, sigmas_respaced(den, "10"), list(range(12)), num_classes=3)
    assert len(out["nonfinite"]) > 0 and len(out["images"]) + len(out["nonfinite"]) == 12
    assert (full["labels"][out["nonfinite"]] == 1).all() and (out["labels"] != 1).all()


DDIM4 = "sampler.schedule.respacing=ddim4"


@pytest.mark.parametrize("overrides, nfe, classifier_nfe", [
    (["guidance=none", DDIM4], 4, 0),                                 # DDIM-N: N
    (["guidance=cfg", "guidance.scale=2", DDIM4], 8, 0),              # one batched forward of 2B rows per step
    (["guidance=classifier", "guidance.scale=1", DDIM4], 4, 4),       # N denoiser, N classifier forward+backward
    (["guidance=classifier", "guidance.scale=1", "sampler=ddpm", "sampler.schedule.respacing=4"], 4, 4),
    (["guidance=none", "sampler=heun", "sampler.schedule.num_steps=4"], 7, 0),  # Heun: 2N - 1
    (["guidance=autoguidance", DDIM4], 8, 0),                         # the main model and the guide model
    (["guidance=dps", "classifier=digits_clean", DDIM4], 8, 4),       # a forward with grad counts 2
    (["guidance=freedom", "classifier=digits_clean", DDIM4], 16, 8),  # N_recur = 2 rounds of each step
    (["guidance=mpgd", "classifier=digits_clean", DDIM4], 4, 4),      # x0-space step: no backprop through D
], ids=["none", "cfg", "classifier", "classifier-ddpm", "heun", "autoguidance", "dps", "freedom", "mpgd"])
def test_nfe_is_counted_per_sample(compose_cfg, overrides, nfe, classifier_nfe):
    import hydra

    from guidebench.sampling import build_backbone, build_guidance

    cfg = compose_cfg("sample", ["backbone=digits", *overrides])
    backbone = build_backbone(cfg.backbone)
    guidance = build_guidance(cfg, "cpu", backbone.decoder)
    sigmas = hydra.utils.instantiate(cfg.sampler.schedule)(backbone.denoiser)
    assert len(sigmas) == 5  # N = 4 steps
    out = generate(backbone.denoiser, hydra.utils.instantiate(cfg.sampler.solver), sigmas, [0, 1, 2],
                   num_classes=backbone.num_classes, guidance=guidance)
    assert (out["nfe"], out["classifier_nfe"]) == (nfe, classifier_nfe)
