"""Cost of PPAP against plain classifier guidance on digits, as ratios measured in one interleaved run.

    python benchmarks/ppap_cost.py [--device cuda] [--batch 256] [--steps 25] [--repeats 5]

On the shipped unconditional digits model, DDIM-N: unguided; classifier guidance with the noise-aware
classifier (`digits_noisy`) and with the clean off-the-shelf CNN the experts were made from (`digits_clean`);
PPAP with the shipped experts (`digits_ppap`: one expert forward and backward per step, routed by noise
level). Prints NFE per sample (denoiser, classifier; counted by `generate`) and each variant's time relative
to unguided sampling and to each plain classifier guidance (min of interleaved runs, benchmarks/timing.py).
"""

from __future__ import annotations

import torch

from guidebench.backbones.digits import load_denoiser
from guidebench.classifiers.digits import load_clean_classifier, load_noisy_classifier
from guidebench.config import REPO_ROOT
from guidebench.generate import generate
from guidebench.guidance import ClassifierGuidance, NoGuidance
from guidebench.guidance.ppap import PPAPGuidance, load_experts
from guidebench.rng import StackedRandomGenerator
from guidebench.samplers import sample_ddim
from guidebench.schedules import sigmas_respaced
from timing import benchmark_args, interleaved


def main() -> None:
    args = benchmark_args(__doc__)
    ckpt, dev = REPO_ROOT / "checkpoints" / "digits", args.device
    den = load_denoiser(ckpt / "diffusion.pt", conditional=False).to(dev).eval()
    clean = load_clean_classifier(ckpt / "clean_classifier.pt")
    methods = {
        "unguided": NoGuidance(),
        "classifier (noisy)": ClassifierGuidance(load_noisy_classifier(ckpt / "noisy_classifier.pt"), 3.0),
        "classifier (clean)": ClassifierGuidance(clean, 3.0),
        "ppap": PPAPGuidance(load_experts(ckpt / "ppap_experts.pt", clean), 7.5),
    }
    methods = {k: m.to(dev) for k, m in methods.items()}
    sigmas = sigmas_respaced(den, f"ddim{args.steps}").to(dev)
    n = args.batch
    x = torch.randn(n, 1, 8, 8, device=dev, dtype=torch.float64) * (1 + sigmas[0] ** 2).sqrt()
    y = torch.arange(n, device=dev) % 10

    def run(guidance):
        def go():
            with torch.no_grad():
                sample_ddim(den, x, sigmas, y, guidance=guidance, rng=StackedRandomGenerator(dev, range(n)))
        return go

    nfe = {k: generate(den, sample_ddim, sigmas, range(16), num_classes=10, guidance=m, device=dev)
           for k, m in methods.items()}
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    best = interleaved({k: run(m) for k, m in methods.items()}, args.repeats, sync)
    print(f"device={dev} batch={n} DDIM-{args.steps} repeats={args.repeats} (min of interleaved runs)")
    print(f"{'variant':<20}{'nfe':>6}{'cls nfe':>9}{'seconds':>9}{'/ unguided':>12}{'/ cls noisy':>13}"
          f"{'/ cls clean':>13}")
    for name, t in best.items():
        print(f"{name:<20}{nfe[name]['nfe']:6.0f}{nfe[name]['classifier_nfe']:9.0f}{t:9.3f}{t / best['unguided']:12.2f}"
              f"{t / best['classifier (noisy)']:13.2f}{t / best['classifier (clean)']:13.2f}")


if __name__ == "__main__":
    main()
