"""The sampling stage: a config in, a folder of sample shards out (multi-process via Accelerate)."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from guidebench.classifiers.decoded import DecodedClassifier
from guidebench.generate import generate
from guidebench.loggers import build_loggers
from guidebench.precision import configure_networks, set_tf32
from guidebench.preemption import Preempted, Preemption
from guidebench.shards import ShardWriter, export_npz, shard_bounds


class NonFiniteSamplesError(RuntimeError):
    """Some samples came out NaN/inf (typically a guidance scale too high); the finite ones are kept."""


@dataclass
class Backbone:
    """What a backbone config builds: the denoiser, an optional decoder (DiT's VAE) and the label space."""

    denoiser: torch.nn.Module
    decoder: object | None
    image_size: int
    num_classes: int
    uint8_rule: str = "adm"


def build_backbone(cfg: DictConfig, device: torch.device | str = "cpu") -> Backbone:
    denoiser = hydra.utils.instantiate(cfg.denoiser)
    denoiser = denoiser.to(device).eval() if isinstance(denoiser, torch.nn.Module) else denoiser
    decoder = hydra.utils.instantiate(cfg.decoder) if cfg.get("decoder") else None
    return Backbone(denoiser, decoder, int(cfg.image_size), int(cfg.num_classes), cfg.get("uint8_rule", "adm"))


def build_guidance(cfg: DictConfig, device: torch.device | str = "cpu", decoder=None):
    """The guidance object; a `classifier` argument is filled from the classifier group.

    A method whose classifier sees the clean estimate (`classifier_sees = "x0"`) on a latent backbone
    gets the classifier through the backbone's `decoder` (`DecodedClassifier`).
    """
    kwargs = {}
    if "classifier" in cfg.guidance:
        if cfg.get("classifier") is None:
            raise ValueError(f"guidance={cfg.tags.guidance} needs a classifier: choose one with classifier=NAME")
        classifier = hydra.utils.instantiate(cfg.classifier).to(device).eval()
        method = hydra.utils.get_class(cfg.guidance._target_)
        if decoder is not None and getattr(method, "classifier_sees", "x") == "x0":
            classifier = DecodedClassifier(classifier, decoder)
        kwargs["classifier"] = classifier
    return hydra.utils.instantiate(cfg.guidance, **kwargs).to(device)


def fingerprint(cfg: DictConfig) -> dict:
    """What determines the samples (not batch size, device, process count or torch.compile)."""
    guidance = OmegaConf.to_container(cfg.guidance, resolve=True)
    uses_classifier = "classifier" in guidance
    return {
        "backbone": cfg.tags.backbone,
        "guidance": cfg.tags.guidance,
        "scale": guidance.get("scale"),
        "sampler": cfg.tags.sampler,
        "classifier": cfg.tags.classifier if uses_classifier else None,
        "num_samples": int(cfg.sampling.num_samples),
        "seed": int(cfg.sampling.seed),
        "shard_size": int(cfg.sampling.shard_size),
        "precision": {"dtype": cfg.sampling.dtype, "tf32": bool(cfg.sampling.tf32)},
        "config": {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True), "guidance": guidance,
                   "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
                   "classifier": OmegaConf.to_container(cfg.classifier, resolve=True) if uses_classifier else None},
    }


def assigned_shards(num_shards: int, shard_range=None, task: int = 0, tasks: int = 1, process: int = 0,
                    processes: int = 1) -> list[int]:
    """The shards one process samples: those of `shard_range` [a, b) (all without one), cut into `tasks`
    contiguous parts of which this is part `task` (a SLURM array task), dealt round-robin to the processes."""
    a, b = (0, num_shards) if shard_range is None else (int(shard_range[0]), int(shard_range[1]))
    if not 0 <= a < b <= num_shards:
        raise ValueError(f"sampling.shard_range=[{a}, {b}) must lie within the run's {num_shards} shards [0, {num_shards})")
    if not 0 <= task < tasks:
        raise ValueError(f"sampling.task={task} must be in 0..sampling.tasks - 1 = {tasks - 1}")
    per_task = -(-(b - a) // tasks)
    mine = range(a + task * per_task, min(b, a + (task + 1) * per_task))
    return list(mine[process::processes])


def sample(cfg: DictConfig) -> Path:
    """Write cfg.sampling.num_samples samples as shards in cfg.sampling.out_dir; return that folder.

    Sample i has seed `sampling.seed + i`; shard k holds samples [k S, (k + 1) S) with S =
    `sampling.shard_size`. Process r of W writes shards r, r + W, ... of its part (`assigned_shards`:
    `sampling.shard_range`, `sampling.task` of `sampling.tasks`). Finished shards (recorded, with their
    recorded sha256) are skipped; the main process then lists every finished shard in run.json, the manifest.
    SIGTERM / SIGUSR1 stop the run between batches (`guidebench.preemption`); what is finished stays.
    """
    from accelerate import PartialState

    state = PartialState(cpu=cfg.sampling.device == "cpu")
    device = state.device
    out_dir = Path(cfg.sampling.out_dir)
    backbone = build_backbone(cfg.backbone, device)
    guidance = build_guidance(cfg, device, backbone.decoder)
    set_tf32(bool(cfg.sampling.tf32))
    configure_networks([backbone.denoiser, *vars(guidance).values()], cfg.sampling.dtype, bool(cfg.sampling.compile))
    solver = hydra.utils.instantiate(cfg.sampler.solver)
    guidance.check(backbone.denoiser, solver)
    sigmas = hydra.utils.instantiate(cfg.sampler.schedule)(backbone.denoiser)

    n, size = int(cfg.sampling.num_samples), int(cfg.sampling.shard_size)
    writer = ShardWriter(out_dir, fingerprint(cfg), num_samples=n, shard_size=size)
    if state.is_main_process:
        writer.prepare(overwrite=bool(cfg.sampling.overwrite), overrides=sample_overrides())
    state.wait_for_everyone()
    part = assigned_shards(writer.num_shards, cfg.sampling.shard_range, int(cfg.sampling.task), int(cfg.sampling.tasks),
                           state.process_index, state.num_processes)
    my_shards = [k for k in part if not writer.done(k)]
    todo = sum(min(size, n - k * size) for k in my_shards)
    try:
        with Preemption() as stop, tqdm(total=todo, desc=f"sampling {cfg.tags.backbone}/{cfg.tags.guidance}",
                                        unit="img", disable=not state.is_main_process) as bar:
            for k in my_shards:
                sample_shard(cfg, writer, k, backbone, guidance, solver, sigmas, device,
                             before_batch=stop.check, after_batch=bar.update,
                             process=(state.process_index, state.num_processes))
    except Preempted:  # list what is finished, then stop
        writer.merge()
        raise
    state.wait_for_everyone()
    if state.is_main_process:
        try:
            finish(cfg, writer)
        finally:  # the record of what was sampled, non-finite samples included
            for logger in build_loggers(cfg.get("logger")):
                logger.log_sample(cfg, out_dir)
    return out_dir


def sample_shard(cfg: DictConfig, writer: ShardWriter, k: int, backbone: Backbone, guidance, solver,
                 sigmas: torch.Tensor, device, before_batch=lambda: None, after_batch=lambda n: None,
                 process: tuple[int, int] = (0, 1)) -> None:
    """Sample shard k in batches of `sampling.batch_size` and write it with its cost (NFE, seconds, device) and
    `process`, (index, count) of the process that wrote it."""
    started = time.perf_counter()
    indices = np.arange(*shard_bounds(k, writer.num_samples, writer.shard_size))
    seed, batch = int(cfg.sampling.seed), int(cfg.sampling.batch_size)
    parts = []
    for start in range(0, len(indices), batch):
        before_batch()
        idx = indices[start:start + batch]
        out = generate(backbone.denoiser, solver, sigmas, (seed + idx).tolist(), num_classes=backbone.num_classes,
                       guidance=guidance, decoder=backbone.decoder, device=device, uint8_rule=backbone.uint8_rule)
        parts.append((out, idx))
        after_batch(len(idx))
    cost = {key: sum(o[key] * len(i) for o, i in parts) / len(indices) for key in ("nfe", "classifier_nfe")}
    writer.write(
        k,
        images=np.concatenate([o["images"] for o, _ in parts]),
        labels=np.concatenate([o["labels"] for o, _ in parts]),
        indices=np.concatenate([i[o["kept"]] for o, i in parts]),
        seeds=np.concatenate([seed + i[o["kept"]] for o, i in parts]),
        nonfinite=np.concatenate([i[o["nonfinite"]] for o, i in parts]),
        cost={**cost, "seconds": round(time.perf_counter() - started, 3), "device": device_name(device),
              "process": process[0], "processes": process[1]},
    )


def sample_overrides() -> list[str] | None:
    """This call's command-line overrides that guidebench-sample takes again to complete its set (all but
    hydra.*, evaluation/metrics, sampling.out_dir, sampling.overwrite and the work split); None outside a Hydra app."""
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return None
    drop = ("hydra", "evaluation", "metrics", "sampling.out_dir", "sampling.overwrite", "sampling.shard_range",
            "sampling.task", "sampling.tasks")
    keys = [o.lstrip("+~").split("=")[0].split("@")[0] for o in overrides]
    return [o for o, key in zip(overrides, keys) if not any(key == d or key.startswith(d + ".") for d in drop)]


def device_name(device: torch.device | str) -> str:
    """The accelerator's name (e.g. 'NVIDIA H100 80GB HBM3'), or the CPU's architecture and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def finish(cfg: DictConfig, writer: ShardWriter) -> None:
    """List the shards in run.json (the manifest, with the run's cost); export one ADM npz if asked; raise if any
    sample was non-finite."""
    manifest = writer.merge()
    bad = sorted(i for entry in manifest["shards"] for i in entry["nonfinite"])
    n = writer.num_samples
    if cfg.sampling.get("export_npz"):
        export_npz(writer.out_dir, cfg.sampling.export_npz)
    if bad:
        raise NonFiniteSamplesError(
            f"{len(bad)} of {n} samples are NaN/inf (first indices {bad[:10]}); the {n - len(bad)} finite "
            f"samples are saved in {writer.out_dir}. Lower guidance.scale (now {cfg.guidance.get('scale')}) or use "
            "more steps."
        )
