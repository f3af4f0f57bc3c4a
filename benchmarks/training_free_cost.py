"""Cost of the training-free family (DPS, FreeDoM, MPGD, UGD, LGD, TFG) as NFE and wall-clock ratios, one run.

    python benchmarks/training_free_cost.py [--device cuda] [--batch 256] [--steps 25] [--repeats 3]

On the shipped unconditional digits model with the clean off-the-shelf classifier (DDIM-N), times whole sampling
runs of each method at its yaml defaults, interleaved with unguided sampling and plain classifier guidance (the
noise-aware classifier), each keeping its minimum over the repeats. Prints per sample the denoiser evaluations
(a forward differentiated through counts 2) and classifier passes, and the time relative to unguided sampling.
"""

from __future__ import annotations

import torch

from guidebench.backbones.digits import load_denoiser
from guidebench.classifiers.digits import load_clean_classifier, load_noisy_classifier
from guidebench.config import REPO_ROOT
from guidebench.generate import CountingDenoiser, GuidanceNetworkCounter
from guidebench.guidance import (ClassifierGuidance, DPSGuidance, FreeDoMGuidance, LossGuidedDiffusion, MPGDGuidance,
                                 NoGuidance, TrainingFreeGuidance, UniversalGuidance)
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim
from guidebench.schedules import sigmas_respaced
from timing import benchmark_args, interleaved


def main() -> None:
    args = benchmark_args(__doc__, repeats=3)
    ckpt, dev = REPO_ROOT / "checkpoints" / "digits", args.device
    den = load_denoiser(ckpt / "diffusion.pt", conditional=False).to(dev).eval()
    clean = load_clean_classifier(ckpt / "clean_classifier.pt").to(dev)
    noisy = load_noisy_classifier(ckpt / "noisy_classifier.pt").to(dev)
    sigmas = sigmas_respaced(den, f"ddim{args.steps}").to(dev)
    n = args.batch
    x = torch.randn(n, 1, 8, 8, device=dev, dtype=torch.float64) * (1 + sigmas[0] ** 2).sqrt()
    y = torch.arange(n, device=dev) % 10
    methods = {"unguided": NoGuidance(), "classifier (noisy)": ClassifierGuidance(noisy, 3.0),
               "dps": DPSGuidance(clean), "freedom": FreeDoMGuidance(clean), "mpgd": MPGDGuidance(clean),
               "ugd": UniversalGuidance(clean), "lgd": LossGuidedDiffusion(clean), "tfg": TrainingFreeGuidance(clean)}
    cost = {}

    def run(name, guidance):
        def go():
            counted = CountingDenoiser(den)
            with torch.no_grad(), GuidanceNetworkCounter(guidance, den) as networks:
                sample_ddim(counted, x, sigmas, y, guidance=guidance, rng=StackedRandomGenerator(dev, range(n)))
            cost[name] = (counted.rows / n, networks.rows["classifier"] / n)
        return go

    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    best = interleaved({name: run(name, g) for name, g in methods.items()}, args.repeats, sync)
    print(f"device={dev} batch={n} steps={args.steps} repeats={args.repeats} (DDIM, min of interleaved runs)")
    print(f"{'method':<20}{'NFE':>6}{'clf':>6}{'seconds':>9}{'/ unguided':>12}")
    for name, t in best.items():
        nfe, clf = cost[name]
        print(f"{name:<20}{nfe:6.0f}{clf:6.0f}{t:9.3f}{t / best['unguided']:12.2f}")


if __name__ == "__main__":
    main()
