"""guidebench-submit: sample one configuration as a SLURM array, then evaluate it once every task succeeded.

    guidebench-submit --tasks 8 --gpus 1 --partition gpu -- experiment=adm_g_256
    guidebench-submit --tasks 3 --gpus 0 --out outputs/runs/cfg2 -- backbone=digits guidance=cfg guidance.scale=2

The overrides are checked (composed) before anything is queued. Array task i of K samples the i-th contiguous
part of the run's shards into the one run folder (`sampling.task`, `sampling.tasks`); the evaluation job
(`--dependency=afterok`) then writes metrics.json, summary.csv and grid.png there. Tasks are requeued on
preemption and on SIGUSR1 before their time limit, and a requeued task skips its finished shards
(slurm/README.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from guidebench.config import CONF_DIR, REPO_ROOT

SLURM_DIR = REPO_ROOT / "slurm"
EVALUATION_KEYS = ("evaluation.", "metrics.", "logger")  # overrides of the evaluation job only


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the sampling array's overrides, the evaluation job's): evaluation.*, metrics.* and logger keys go to the
    latter (the suite itself, metrics=NAME, is read from the resolved config), so logger=wandb logs one W&B run of
    job_type evaluate per submitted setting, not one per array task."""
    evaluation = [o for o in overrides if o.lstrip("+~").startswith(EVALUATION_KEYS)]
    return [o for o in overrides if o not in evaluation], evaluation


def resolve(overrides: list[str]):
    """guidebench-run's config for these overrides (raises Hydra's error for an unknown group or key)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("run", overrides=overrides, return_hydra_config=True)


def sbatch(args: list[str], env: dict, dry_run: bool) -> str:
    """Submit with `sbatch --parsable`; the job id (a placeholder when dry_run)."""
    command = ["sbatch", "--parsable", *args]
    print("$", shlex.join(command))
    if dry_run:
        return "JOBID"
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> None:
    submit(argv)


def submit(argv: list[str] | None = None) -> dict:
    """Queue the sampling array and the evaluation job; returns their ids, the run folder and the log folder."""
    parser = argparse.ArgumentParser(prog="guidebench-submit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1, help="array tasks, each sampling a contiguous part of the shards")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per task, one process each (0: CPU)")
    parser.add_argument("--cpus", type=int, default=8, help="CPUs per task")
    parser.add_argument("--mem", default="64G", help="memory per task (sbatch --mem)")
    parser.add_argument("--time", default="04:00:00", help="time limit per task (sbatch --time)")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--signal-seconds", type=int, default=120,
                        help="SIGUSR1 this many seconds before the time limit: the task stops and requeues itself")
    parser.add_argument("--out", default=None, help="the run folder (default outputs/runs/<name>-<time>)")
    parser.add_argument("--name", default="guidebench", help="job name prefix")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option for both jobs")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch calls, submit nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of guidebench-run (after --)")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.gpus < 0:
        parser.error("--tasks must be >= 1 and --gpus >= 0")

    sample_overrides, evaluation_overrides = split_overrides(args.overrides)
    try:
        cfg = resolve(args.overrides)
    except Exception as e:  # Hydra's and OmegaConf's errors name the bad group, choice or key
        parser.error(f"the overrides do not compose: {e}")
    num_shards = -(-int(cfg.sampling.num_samples) // int(cfg.sampling.shard_size))
    if args.tasks > num_shards:
        parser.error(f"--tasks {args.tasks} exceeds the run's {num_shards} shards (sampling.num_samples / "
                     f"sampling.shard_size); use at most {num_shards} tasks or smaller shards")
    out = Path(args.out or f"outputs/runs/{args.name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    logs = out / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    metrics = cfg.hydra.runtime.choices.metrics
    env = {**os.environ, "GUIDEBENCH_BIN": str(Path(sys.executable).parent), "GUIDEBENCH_GPUS": str(args.gpus),
           "GUIDEBENCH_LOGS": str(logs)}
    common = [f"--partition={args.partition}"] if args.partition else []
    common += args.sbatch_arg
    resources = [f"--cpus-per-task={args.cpus}", f"--mem={args.mem}", f"--time={args.time}"]
    gres = [f"--gres=gpu:{args.gpus}"] if args.gpus else []
    sample_job = sbatch([*common, *resources, *gres, f"--array=0-{args.tasks - 1}", f"--job-name={args.name}-sample",
                         f"--output={logs}/sample-%A_%a.out", "--requeue", f"--signal=USR1@{args.signal_seconds}",
                         str(SLURM_DIR / "sample.sbatch"), *sample_overrides, f"sampling.out_dir={out}"],
                        env, args.dry_run)
    evaluate_job = sbatch([*common, f"--cpus-per-task={args.cpus}", f"--mem={args.mem}", *(["--gres=gpu:1"] if args.gpus else []),
                           f"--dependency=afterok:{sample_job}", f"--job-name={args.name}-evaluate",
                           f"--output={logs}/evaluate-%j.out", str(SLURM_DIR / "evaluate.sbatch"), str(out),
                           f"metrics={metrics}", *evaluation_overrides], env, args.dry_run)
    print(f"sampling array {sample_job} ({args.tasks} tasks) -> {out}\nevaluation {evaluate_job} after it succeeds; "
          f"logs in {logs}")
    return {"sample_job": sample_job, "evaluate_job": evaluate_job, "out": str(out), "logs": str(logs)}


if __name__ == "__main__":
    main()
