"""The sampling stage: a config in, a folder of sample shards out (multi-process via Accelerate)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from guidebench.classifiers.decoded import DecodedClassifier
from guidebench.generate import generate
from guidebench.shards import ShardWriter, export_npz, read_shard


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
    return hydra.utils.instantiate(cfg.guidance, **kwargs)


def fingerprint(cfg: DictConfig) -> dict:
    """What determines the samples (not batch size, device or process count)."""
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
        "config": {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True), "guidance": guidance,
                   "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
                   "classifier": OmegaConf.to_container(cfg.classifier, resolve=True) if uses_classifier else None},
    }


def sample(cfg: DictConfig) -> Path:
    """Write cfg.sampling.num_samples samples as shards in cfg.sampling.out_dir; return that folder.

    Sample i has seed `sampling.seed + i`; shard k holds samples [k S, (k + 1) S) with S =
    `sampling.shard_size`, and process r of W writes shards r, r + W, ... Finished shards are skipped.
    """
    from accelerate import PartialState

    state = PartialState(cpu=cfg.sampling.device == "cpu")
    device = state.device
    out_dir = Path(cfg.sampling.out_dir)
    backbone = build_backbone(cfg.backbone, device)
    guidance = build_guidance(cfg, device, backbone.decoder)
    solver = hydra.utils.instantiate(cfg.sampler.solver)
    guidance.check(backbone.denoiser, solver)
    sigmas = hydra.utils.instantiate(cfg.sampler.schedule)(backbone.denoiser)

    n, size, batch = int(cfg.sampling.num_samples), int(cfg.sampling.shard_size), int(cfg.sampling.batch_size)
    writer = None
    if state.is_main_process:
        writer = ShardWriter(out_dir, fingerprint(cfg), overwrite=bool(cfg.sampling.overwrite))
    state.wait_for_everyone()
    writer = writer or ShardWriter(out_dir, fingerprint(cfg))
    my_shards = [k for k in range(math.ceil(n / size))[state.process_index::state.num_processes] if not writer.done(k)]
    todo = sum(min(size, n - k * size) for k in my_shards)
    with tqdm(total=todo, desc=f"sampling {cfg.tags.backbone}/{cfg.tags.guidance}", unit="img",
              disable=not state.is_main_process) as bar:
        for k in my_shards:
            indices = np.arange(k * size, min((k + 1) * size, n))
            parts = []
            for start in range(0, len(indices), batch):
                idx = indices[start:start + batch]
                out = generate(backbone.denoiser, solver, sigmas, (cfg.sampling.seed + idx).tolist(),
                               num_classes=backbone.num_classes, guidance=guidance, decoder=backbone.decoder,
                               device=device, uint8_rule=backbone.uint8_rule)
                parts.append((out, idx))
                bar.update(len(idx))
            writer.write(
                k,
                images=np.concatenate([o["images"] for o, _ in parts]),
                labels=np.concatenate([o["labels"] for o, _ in parts]),
                indices=np.concatenate([i[o["kept"]] for o, i in parts]),
                seeds=np.concatenate([cfg.sampling.seed + i[o["kept"]] for o, i in parts]),
                nonfinite=np.concatenate([i[o["nonfinite"]] for o, i in parts]),
            )
    state.wait_for_everyone()
    if state.is_main_process:
        finish(cfg, out_dir, n, size)
    return out_dir


def finish(cfg: DictConfig, out_dir: Path, n: int, size: int) -> None:
    """Count what was written; export one ADM npz if asked; raise if any sample was non-finite."""
    shards = [read_shard(out_dir / "shards" / f"shard-{k:06d}.npz") for k in range(math.ceil(n / size))]
    bad = np.concatenate([s["nonfinite"] for s in shards])
    run_json = out_dir / "run.json"
    info = json.loads(run_json.read_text())
    info.update(written=int(sum(len(s["arr_0"]) for s in shards)), nonfinite=int(len(bad)))
    run_json.write_text(json.dumps(info, indent=2, sort_keys=True))
    if cfg.sampling.get("export_npz"):
        export_npz(out_dir, cfg.sampling.export_npz)
    if len(bad):
        raise NonFiniteSamplesError(
            f"{len(bad)} of {n} samples are NaN/inf (first indices {bad[:10].tolist()}); the {n - len(bad)} finite "
            f"samples are saved in {out_dir}. Lower guidance.scale (now {cfg.guidance.get('scale')}) or use more steps."
        )
