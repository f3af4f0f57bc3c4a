"""DOODL's peak memory at N and 4 N EDICT steps (backpropagation by inversion: the ratio stays near 1), against
autograd through the whole chain (grows with N), and its cost per optimisation iteration in NFE and seconds.

    python benchmarks/doodl_memory.py                  # digits model, N = 10, batch 64, CPU
    python benchmarks/doodl_memory.py --steps 25 --batch 256

Each measurement runs in a fresh process: peak RSS (ru_maxrss) during one DOODL iteration minus the peak before
it (model, classifier and a warm-up forward loaded). `inversion` is guidebench's DOODL (`DOODLGuidance.optimise`,
gradient by `samplers.edict_vjp`); `autograd` differentiates through `samplers.edict_chain` as one graph.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints" / "digits"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, steps: int, batch: int) -> dict:
    from guidebench.classifiers.digits import load_clean_classifier
    from guidebench.backbones.digits import load_denoiser
    from guidebench.generate import CountingDenoiser, GuidanceNetworkCounter
    from guidebench.guidance.doodl import DOODLGuidance
    from guidebench.rng import StackedRandomGenerator
    from guidebench.samplers import edict_chain
    from guidebench.schedules import sigmas_respaced

    torch.set_num_threads(1)
    denoiser = CountingDenoiser(load_denoiser(CHECKPOINTS / "diffusion.pt"))
    doodl = DOODLGuidance(load_clean_classifier(CHECKPOINTS / "clean_classifier.pt"), num_iterations=1)
    sigmas = sigmas_respaced(denoiser, f"ddim{steps}")
    rng = StackedRandomGenerator("cpu", range(batch))
    z = rng.randn([batch, 1, 8, 8]).double()
    labels = rng.randint(10, size=[batch])
    with torch.no_grad():
        denoiser(z.float(), sigmas[:1].expand(batch), labels)
    denoiser.rows, before = 0, peak_mib()
    started = time.perf_counter()
    with torch.no_grad(), GuidanceNetworkCounter(doodl, denoiser) as networks:
        if method == "inversion":
            doodl.optimise(denoiser, z, sigmas, labels, rng)
        else:
            with torch.enable_grad():
                start = (z * (1 + sigmas[0] ** 2).sqrt()).requires_grad_(True)
                final = edict_chain(denoiser, start, start, sigmas, labels)
                loss = doodl.loss(torch.cat(final), torch.cat([labels, labels])).sum()
                torch.autograd.grad(loss, start)
    seconds = time.perf_counter() - started
    return {"peak_mib": peak_mib() - before, "seconds": seconds, "nfe": denoiser.rows / batch,
            "classifier_nfe": networks.rows["classifier"] / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch)))
        return
    for method in ("inversion", "autograd"):
        peaks = []
        for n in (args.steps, 4 * args.steps):
            cmd = [sys.executable, __file__, "--child", method, str(n), "--batch", str(args.batch)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            peaks.append(r["peak_mib"])
            print(f"{method:9s} N={n:4d}  peak +{r['peak_mib']:7.1f} MiB  NFE/iteration {r['nfe']:6.0f} "
                  f"(+{r['classifier_nfe']:.0f} classifier)  {r['seconds'] / args.batch * 1e3:7.2f} ms/sample "
                  f"({r['seconds']:.2f} s, batch {args.batch})", flush=True)
        print(f"{method:9s} peak memory ratio 4N / N = {peaks[1] / max(peaks[0], 1e-9):.2f}", flush=True)


if __name__ == "__main__":
    main()
