"""Sampling speed ratios measured in one run (CPU or GPU): what guidebench's design choices cost.

    python benchmarks/sampling_speed.py [--device cuda] [--batch 256] [--steps 50]

Prints, for the shipped digits model (or a random one of the same architecture if absent):
  per-seed RNG      time of a DDPM run with one generator per sample / with one batched generator
  CFG batched       time of CFG as one batched forward / as two forwards
  classifier guid.  time of DDIM with classifier guidance / without
"""

from __future__ import annotations

import argparse

import torch

from guidebench.config import REPO_ROOT
from guidebench.guidance import ClassifierFreeGuidance, ClassifierGuidance, NoGuidance
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim, sample_ddpm
from guidebench.schedules import sigmas_respaced
from timing import interleaved


class BatchedRandom:
    """One generator for the whole batch (what most code bases do): fast, but batch-size dependent."""

    def __init__(self, seed: int, device):
        self.g = torch.Generator(device).manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.g, device=x.device, dtype=x.dtype)


class TwoForwardCFG(ClassifierFreeGuidance):
    def __call__(self, denoiser, x, sigma, labels, mean_form=False, step=None):
        cond = denoiser(x, sigma, labels)
        uncond = denoiser(x, sigma, torch.full_like(labels, denoiser.null_label))
        return cond._replace(x0=uncond.x0 + self.scale * (cond.x0 - uncond.x0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    from guidebench.backbones.digits import load_denoiser
    from guidebench.classifiers.digits import load_noisy_classifier

    ckpt = REPO_ROOT / "checkpoints" / "digits"
    den = load_denoiser(ckpt / "diffusion.pt").to(args.device).eval()
    clf = load_noisy_classifier(ckpt / "noisy_classifier.pt").to(args.device).eval()
    sigmas = sigmas_respaced(den, str(args.steps)).to(args.device)
    n = args.batch
    x = torch.randn(n, 1, 8, 8, device=args.device, dtype=torch.float64) * (1 + sigmas[0] ** 2).sqrt()
    y = torch.arange(n, device=args.device) % 10

    def run(solver, guidance, rng):
        with torch.no_grad():
            solver(den, x, sigmas, y, guidance=guidance, rng=rng)

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t = interleaved({
        "per_seed": lambda: run(sample_ddpm, NoGuidance(), StackedRandomGenerator(args.device, range(n))),
        "batched": lambda: run(sample_ddpm, NoGuidance(), BatchedRandom(0, args.device)),
        "cfg_one": lambda: run(sample_ddim, ClassifierFreeGuidance(2.0), None),
        "cfg_two": lambda: run(sample_ddim, TwoForwardCFG(2.0), None),
        "plain": lambda: run(sample_ddim, NoGuidance(), None),
        "classifier": lambda: run(sample_ddim, ClassifierGuidance(clf, 1.0), None),
    }, sync=sync)
    per_seed, batched, cfg_one, cfg_two, plain, classifier = (t[k] for k in (
        "per_seed", "batched", "cfg_one", "cfg_two", "plain", "classifier"))
    print(f"device={args.device} batch={n} steps={args.steps} (min of 3 interleaved rounds)")
    print(f"per-seed RNG / batched RNG (DDPM):        {per_seed / batched:6.2f}  ({per_seed:.2f}s vs {batched:.2f}s)")
    print(f"CFG one batched forward / two forwards:   {cfg_one / cfg_two:6.2f}  ({cfg_one:.2f}s vs {cfg_two:.2f}s)")
    print(f"classifier guidance / unguided (DDIM):    {classifier / plain:6.2f}  ({classifier:.2f}s vs {plain:.2f}s)")


if __name__ == "__main__":
    main()
