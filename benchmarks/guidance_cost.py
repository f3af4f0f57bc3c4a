"""Cost of the seed papers' gradient guidance, as ratios measured in one interleaved run.

    python benchmarks/guidance_cost.py [--device cuda] [--batch 256] [--steps 25] [--repeats 5]

On the shipped unconditional digits model (DDIM-25, or DDPM-25 for EluCD's DDPM branch), times whole
sampling runs of: unguided, classifier guidance (noise-aware classifier), EDS (same classifier), EluCD's
DDPM branch and its EDM branch (clean off-the-shelf classifier); on the conditional model (DDIM-25): CFG,
CFG in the interval (0.28, 5.42], APG and autoguidance (with the shipped guide). The variants run interleaved (A, B, C, ...,
A, B, C, ...) and each keeps its minimum over the repeats, so a loaded machine cannot flip a ratio. Prints
each variant's time relative to unguided sampling (same solver) and to plain classifier guidance.
"""

from __future__ import annotations

import torch

from guidebench.backbones.digits import load_denoiser
from guidebench.classifiers.digits import load_clean_classifier, load_noisy_classifier
from guidebench.config import REPO_ROOT
from guidebench.guidance import (AdaptiveProjectedGuidance, AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance,
                                 EluCDEDMGuidance, EluCDGuidance, EntropyDrivenGuidance, NoGuidance)
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim, sample_ddpm
from guidebench.schedules import sigmas_respaced
from timing import benchmark_args, interleaved


def main() -> None:
    args = benchmark_args(__doc__)
    ckpt, dev = REPO_ROOT / "checkpoints" / "digits", args.device
    den = load_denoiser(ckpt / "diffusion.pt", conditional=False).to(dev).eval()
    cond = load_denoiser(ckpt / "diffusion.pt").to(dev).eval()
    guide = load_denoiser(ckpt / "diffusion_guide.pt").to(dev).eval()
    noisy = load_noisy_classifier(ckpt / "noisy_classifier.pt").to(dev)
    clean = load_clean_classifier(ckpt / "clean_classifier.pt").to(dev)
    sigmas = sigmas_respaced(den, str(args.steps)).to(dev)
    n = args.batch
    x = torch.randn(n, 1, 8, 8, device=dev, dtype=torch.float64) * (1 + sigmas[0] ** 2).sqrt()
    y = torch.arange(n, device=dev) % 10

    def run(solver, guidance, model=den):
        def go():
            with torch.no_grad():
                solver(model, x, sigmas, y, guidance=guidance, rng=StackedRandomGenerator(dev, range(n)))
        return go

    fns = {
        "unguided (DDIM)": run(sample_ddim, NoGuidance()),
        "classifier (DDIM)": run(sample_ddim, ClassifierGuidance(noisy, 3.0)),
        "eds (DDIM)": run(sample_ddim, EntropyDrivenGuidance(noisy, 3.0)),
        "elucd_edm (DDIM)": run(sample_ddim, EluCDEDMGuidance(clean, 0.03)),
        "unguided (DDPM)": run(sample_ddpm, NoGuidance()),
        "classifier (DDPM)": run(sample_ddpm, ClassifierGuidance(noisy, 3.0)),
        "elucd (DDPM)": run(sample_ddpm, EluCDGuidance(clean, 0.1)),
        "unguided (cond)": run(sample_ddim, NoGuidance(), cond),
        "cfg (cond)": run(sample_ddim, ClassifierFreeGuidance(2.0), cond),
        "cfg_interval (cond)": run(sample_ddim, ClassifierFreeGuidance(2.0, interval=[0.28, 5.42]), cond),
        "apg (cond)": run(sample_ddim, AdaptiveProjectedGuidance(2.0), cond),
        "autoguidance (cond)": run(sample_ddim, AutoGuidance(guide, 2.0), cond),
    }
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    best = interleaved(fns, args.repeats, sync)
    print(f"device={dev} batch={n} steps={args.steps} repeats={args.repeats} (min of interleaved runs)")
    print(f"{'variant':<22}{'seconds':>9}{'/ unguided':>12}{'/ classifier':>14}")
    for name, t in best.items():
        form = name[name.index("("):]
        plain = best.get("classifier " + form)
        print(f"{name:<22}{t:9.3f}{t / best['unguided ' + form]:12.2f}" + (f"{t / plain:14.2f}" if plain else ""))


if __name__ == "__main__":
    main()
