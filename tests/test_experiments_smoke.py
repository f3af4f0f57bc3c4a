"""Every experiment (conf/experiment/*.yaml, found at run time) resolves, and runs end to end on CPU at smoke size.

Fast: each experiment's job config resolves completely (what `guidebench-run experiment=X --cfg job --resolve`
prints), sets an ImageNet benchmark's sample count and metrics suite, and every checkpoint it names has a
random-weight builder in tests/released_formats.py. (test_configs.py composes every experiment and instantiates
its guidance and solver; this adds the whole resolved job and the checkpoints.)

Slow: each runnable experiment with its real architecture: random weights written in the released formats
(cached per session; GUIDEBENCH_SMOKE_CHECKPOINTS=DIR keeps them between sessions), 2 samples in one shard of 2,
2 sampler steps (DOODL: 1 optimisation iteration, in batches of 1 for memory), float32 on CPU, then its own
metrics suite with the real Inception network against a 16-image random reference batch written here
(precision/recall with k = 1: the k-NN radii of 2 samples need k < 2). Rows whose `paper` block says
`runnable: false` or `released_checkpoint: false` are skipped with their reason; `demo` is the digits demo,
not an ImageNet row. On 2 CPU cores an ADM-256 row takes 2-3 minutes, ADM-512 about 5, DOODL on ADM-256 the most.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict

from guidebench.config import CONF_DIR
from tests.released_formats import ReleasedCheckpoints, reference_npz

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if p.stem != "demo")
IMAGENET_SAMPLES = 50_000
SMOKE_SAMPLES = 2
SMOKE_STEPS = 2


def not_runnable(cfg) -> str | None:
    """The reason an experiment cannot run (its paper block's runnable / released_checkpoint: false), or None."""
    paper = cfg.get("paper") or {}
    for key in ("runnable", "released_checkpoint"):
        if paper.get(key, True) is False:
            reason = next((paper.get(k) for k in (f"{key}_reason", "reason") if paper.get(k)), None)
            return f"paper.{key}: false ({reason or 'no reason given'})"
    return None


def job_config(cfg) -> dict:
    """The job config as `--cfg job --resolve` prints it: everything but the hydra node, resolved."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def stated_sample_count(paper) -> int:
    """The sample count the paper block states ("10,000 samples"), else ImageNet's 50,000."""
    text = " ".join(str(paper.get(k) or "") for k in ("evaluator", "source"))
    counts = {int(m.replace(",", "")) for m in re.findall(r"(\d{1,3}(?:,\d{3})+|\d+) samples", text)}
    return counts.pop() if len(counts) == 1 else IMAGENET_SAMPLES


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_resolves(compose_cfg, tmp_path, experiment):
    cfg = compose_cfg("run", [f"experiment={experiment}"])
    job = job_config(cfg)
    json.dumps(job)  # plain data all the way down
    paper = job.get("paper") or {}
    assert cfg.hydra.runtime.choices.metrics != "digits", "an ImageNet row must choose its metrics suite"
    assert job["metrics"]["name"] and job["metrics"]["extractors"]
    assert job["sampling"]["num_samples"] == stated_sample_count(paper)
    assert job["sampling"]["num_samples"] % job["sampling"]["shard_size"] == 0
    assert job["backbone"]["num_classes"] == 1000
    if job["metrics"].get("references"):  # the suite has a reference batch for the samples' resolution
        assert int(job["backbone"]["image_size"]) in {int(k) for k in job["metrics"]["references"]}
    reason = not_runnable(cfg)
    if reason:
        assert "no reason given" not in reason, f"{experiment}: say why it cannot run ({reason})"
        return
    planned = ReleasedCheckpoints(tmp_path / "released").plan(cfg)  # raises if a checkpoint has no builder
    assert "backbone.denoiser" in planned


# ----------------------------------------------------------------------------------------------
# Smoke runs


@pytest.fixture(scope="session")
def released(tmp_path_factory):
    """The session's random checkpoints (about 20 GB for all experiments, deleted at the end unless kept in
    GUIDEBENCH_SMOKE_CHECKPOINTS=DIR, where later sessions reuse them)."""
    keep = os.environ.get("GUIDEBENCH_SMOKE_CHECKPOINTS")
    checkpoints = ReleasedCheckpoints(Path(keep) if keep else tmp_path_factory.mktemp("released"))
    yield checkpoints
    if not keep:
        shutil.rmtree(checkpoints.root, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_shared(tmp_path_factory):
    """A folder for the reference batches (one per resolution) and the evaluator's feature cache."""
    return tmp_path_factory.mktemp("smoke-shared")


@pytest.fixture(scope="session")
def timings(request):
    times: dict[str, float] = {}
    yield times
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if times and reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_sep("-", "experiment smoke runs (seconds: writing checkpoints, running)")
            for name, (write, seconds) in sorted(times.items(), key=lambda kv: -kv[1][1]):
                reporter.write_line(f"{name:40s} {write:7.1f} {seconds:8.1f}")
            reporter.write_line(f"{'total':40s} {sum(w for w, _ in times.values()):7.1f} "
                                f"{sum(s for _, s in times.values()):8.1f}")


def smoke_overrides(cfg, reference: Path, cache: Path) -> list[str]:
    """Hydra overrides that shrink an experiment to 2 samples and 2 steps on CPU, scored against `reference`."""
    doodl = "num_iterations" in cfg.guidance  # DOODL's optimisation of the start noise: 1 update
    # DOODL in batches of 1 (samples do not depend on the batch size): the backward through each EDICT step keeps a
    # batch's activations, ~5.5 GB per ADM-256 sample
    out = [f"sampling.num_samples={SMOKE_SAMPLES}", f"sampling.batch_size={1 if doodl else SMOKE_SAMPLES}",
           f"sampling.shard_size={SMOKE_SAMPLES}", "sampling.device=cpu",
           f"evaluation.reference={reference}", f"evaluation.cache_dir={cache}", "evaluation.device=cpu"]
    schedule = cfg.sampler.schedule
    if schedule._target_.endswith("sigmas_respaced"):  # ADM's respacing: "ddimN" or "N" steps
        ddim = str(schedule.respacing).startswith("ddim")
        out.append(f"sampler.schedule.respacing='{'ddim' if ddim else ''}{SMOKE_STEPS}'")
    elif "num_steps" in schedule:  # Karras / EDM schedules
        out.append(f"sampler.schedule.num_steps={SMOKE_STEPS}")
    else:
        raise LookupError(f"no smoke step count for schedule {schedule._target_}")
    if doodl:
        out.append("guidance.num_iterations=1")
    for key in ("backbone.denoiser", "classifier", "classifier.base"):  # float32 networks on CPU
        node = OmegaConf.select(cfg, key)
        if node is not None and "dtype" in node:
            out.append(f"{key}.dtype=float32")
    for label, spec in cfg.metrics.extractors.items():
        if "prc" in spec.metrics:  # k-NN radii within 2 samples: k = 1
            out.append(f"metrics.extractors.{label}.options.prc_neighborhood={SMOKE_SAMPLES - 1}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_at_smoke_size(compose_cfg, released, smoke_shared, timings, tmp_path, experiment):
    from guidebench.cli.run import run
    from guidebench.shards import list_shards, read_shard

    cfg = compose_cfg("run", [f"experiment={experiment}"])
    reason = not_runnable(cfg)
    if reason:
        pytest.skip(reason)
    size = int(cfg.backbone.image_size)
    reference = smoke_shared / f"reference-{size}.npz"
    if not reference.exists():
        reference_npz(reference, size)
    cfg = compose_cfg("run", [f"experiment={experiment}", *smoke_overrides(cfg, reference, smoke_shared / "cache")])
    started = time.perf_counter()
    released.point(cfg)
    written = time.perf_counter() - started

    started = time.perf_counter()
    metrics = run(cfg)
    timings[experiment] = (written, time.perf_counter() - started)

    out_dir = Path(cfg.sampling.out_dir)
    (shard,) = [read_shard(p) for p in list_shards(out_dir)]
    assert shard["arr_0"].shape == (SMOKE_SAMPLES, size, size, 3) and shard["arr_0"].dtype == np.uint8
    assert shard["arr_1"].shape == (SMOKE_SAMPLES,) and ((0 <= shard["arr_1"]) & (shard["arr_1"] < 1000)).all()
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved["num_samples"] == SMOKE_SAMPLES and saved["suite"] == cfg.metrics.name
    assert np.isfinite(saved["fid"]) and saved["fid"] == metrics["fid"]
    for label, spec in cfg.metrics.extractors.items():
        suffix = spec.get("suffix", "")
        for metric, keys in (("fid", ["fid"]), ("sfid", ["sfid"]), ("prc", ["precision", "recall"])):
            if metric in spec.metrics:
                assert all(np.isfinite(saved[k + suffix]) for k in keys), (label, metric, saved)
    assert (out_dir / "summary.csv").is_file()
    del metrics
    gc.collect()
