"""Throughput of guidebench-sample's inner loop against a bare hand-written loop, as ratios of one interleaved run.

    python benchmarks/throughput.py [--device cuda] [--batch 256] [--steps 25] [--repeats 5]

On the shipped digits model, one shard of `--batch` samples in one batch with DDIM-`steps` (eta = 0):
  framework   `sampling.sample_shard` (guidance=none): per-seed RNG, the sigma-space denoiser, float64 solver
              maths, uint8 conversion and the shard write (npz, sha256, record)
  bare        ADM's DDIM (Song et al. 2021, eq. 12; clipped x0, eps recomputed from it) over the same UNet in
              VP coordinates: one batched randn, the network, float32 updates, uint8
  bare 2B     the bare loop on 2 `--batch` rows: what the network alone costs at CFG's batch
  cfg         `sampling.sample_shard` with guidance=cfg: one batched forward of 2B rows per step
Prints images/s of each and the ratios framework / bare (the framework's overhead, goal <= 1.03), cfg /
framework (goal <= 2.0) and bare 2B / bare (the network's own scaling from B to 2B rows, which bounds the
previous one from below), each variant timed at its minimum over interleaved rounds (benchmarks/timing.py).
"""

from __future__ import annotations

import tempfile

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from guidebench.config import CONF_DIR
from guidebench.generate import to_uint8
from guidebench.sampling import build_backbone, build_guidance, sample_shard
from guidebench.schedules import space_timesteps
from guidebench.shards import ShardWriter
from timing import benchmark_args, interleaved


def sample_config(device: str, batch: int, steps: int, guidance: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[
            "backbone=digits", f"guidance={guidance}", f"sampler.schedule.respacing=ddim{steps}",
            f"sampling.batch_size={batch}", f"sampling.shard_size={batch}", f"sampling.num_samples={batch}",
            f"sampling.device={device}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@torch.no_grad()
def bare_ddim(net, abar: torch.Tensor, timesteps: list[int], n: int, num_classes: int, device) -> torch.Tensor:
    """ADM's ddim_sample loop with eta = 0 and clip_denoised, hand-written over the eps network."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn([n, 1, 8, 8], generator=g, device=device)
    y = torch.randint(num_classes, [n], generator=g, device=device)
    for t, t_prev in zip(timesteps[::-1], [*timesteps[-2::-1], None]):
        a, a_prev = abar[t], abar[t_prev] if t_prev is not None else abar.new_ones(())
        eps = net(x, torch.full([n], t, device=device), y)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return to_uint8(x)


def main() -> None:
    args = benchmark_args(__doc__)
    dev, n = args.device, args.batch
    out = tempfile.TemporaryDirectory(prefix="guidebench-throughput-")
    runs = {}
    for guidance in ("none", "cfg"):
        cfg = sample_config(dev, n, args.steps, guidance)
        backbone = build_backbone(cfg.backbone, dev)
        method = build_guidance(cfg, dev)
        solver = hydra.utils.instantiate(cfg.sampler.solver)
        sigmas = hydra.utils.instantiate(cfg.sampler.schedule)(backbone.denoiser)
        writer = ShardWriter(f"{out.name}/{guidance}", {"benchmark": guidance}, num_samples=n, shard_size=n)
        runs[guidance] = (lambda c=cfg, w=writer, b=backbone, m=method, s=solver, sg=sigmas:
                          sample_shard(c, w, 0, b, m, s, sg, dev))
    den = backbone.denoiser
    timesteps = space_timesteps(den.num_timesteps, f"ddim{args.steps}")
    abar = den.alphas_cumprod.to(dev, torch.float32)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    t = interleaved({"framework": runs["none"],
                     "bare": lambda: bare_ddim(den.net, abar, timesteps, n, backbone.num_classes, dev),
                     "bare 2B": lambda: bare_ddim(den.net, abar, timesteps, 2 * n, backbone.num_classes, dev),
                     "cfg": runs["cfg"]}, repeats=args.repeats, sync=sync)
    out.cleanup()
    print(f"digits, DDIM-{args.steps}, batch {n}, device={dev}, {torch.get_num_threads()} threads "
          f"(min of {args.repeats} interleaved rounds)")
    for name, seconds in t.items():
        images = 2 * n if name == "bare 2B" else n
        print(f"  {name:10s} {images / seconds:9.1f} images/s  ({seconds:.3f} s)")
    print(f"framework / bare (overhead, goal <= 1.03):       {t['framework'] / t['bare']:.3f}")
    print(f"cfg / unguided (batched CFG, goal <= 2.0):       {t['cfg'] / t['framework']:.3f}")
    print(f"bare 2B / bare (the network from B to 2B rows):  {t['bare 2B'] / t['bare']:.3f}")


if __name__ == "__main__":
    main()
