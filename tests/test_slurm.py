"""guidebench on a real (single-node, local) Slurm cluster: a sweep as one array job, guidebench-submit's sampling
array + dependent evaluation, and a task that requeues itself on SIGUSR1."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_cli import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm_cluster():
    """Install (Debian slurm-wlm, munge) and start slurmctld + slurmd on this host, as root."""
    if os.geteuid() != 0 and shutil.which("sinfo") is None:
        pytest.skip("starting a local Slurm cluster needs root (apt-get, daemons)")
    proc = subprocess.run(["bash", str(REPO / "slurm" / "start_local_cluster.sh")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return True


@pytest.mark.slurm
def test_sweep_runs_as_a_slurm_array(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("guidebench-run", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=15",
               "backbone=digits", "guidance=cfg", "guidance.scale=1,3", "sampling.num_samples=64",
               f"hydra.sweep.dir={sweep}", f"evaluation.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    submitit = sweep / ".submitit"
    (script,) = submitit.glob("*/*_submission.sh")
    assert "#SBATCH --array=0-1%" in script.read_text()  # one array job, a task per setting
    tasks = sorted(p.name for p in submitit.iterdir() if p.is_dir() and "_" in p.name)
    assert tasks == [f"{script.parent.name}_0", f"{script.parent.name}_1"], proc.stdout
    assert all(any((submitit / t).glob("*_result.pkl")) for t in tasks)  # each task ran and returned under Slurm
    scales = sorted(json.loads(p.read_text())["fingerprint"]["scale"] for p in sweep.rglob("run.json"))
    assert scales == [1.0, 3.0]
    assert all((p.parent / "metrics.json").is_file() for p in sweep.rglob("run.json"))


SUBMIT = ["--gpus", "0", "--cpus", "1", "--mem", "2G", "--"]
RUN = ["backbone=digits", "guidance=cfg", "guidance.scale=2", "sampling.num_samples=48", "sampling.shard_size=8",
       "sampling.batch_size=4", "sampler.schedule.respacing=ddim10"]


def wait_for(jobs, timeout=900, every=2):
    """Until none of `jobs` is queued; fail with the reason if a dependency can no longer be met."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", ",".join(jobs)], capture_output=True,
                                text=True).stdout.split("\n")
        queued = [line for line in queued if line.strip()]
        if not queued:
            return
        assert not any("DependencyNeverSatisfied" in line for line in queued), queued
        time.sleep(every)
    raise AssertionError(f"jobs {jobs} still queued after {timeout} s")


def submit(tmp_path, out, *args):
    from guidebench.cli.submit import submit as submit_jobs

    return submit_jobs([*args, "--out", str(out), *SUBMIT, *RUN, f"evaluation.cache_dir={tmp_path / 'cache'}"])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The same configuration sampled and scored on this machine, without Slurm."""
    tmp = tmp_path_factory.mktemp("local")
    cli("guidebench-run", *RUN, f"hydra.run.dir={tmp / 'run'}", f"evaluation.cache_dir={tmp / 'cache'}", cwd=tmp)
    return tmp / "run"


def shard_bytes(run):
    return {p.name: p.read_bytes() for p in sorted((run / "shards").glob("shard-*.npz"))}


@pytest.mark.slurm
def test_submit_samples_as_an_array_then_evaluates_after_it(slurm_cluster, local_run, tmp_path):
    jobs = submit(tmp_path, tmp_path / "run", "--tasks", "3")
    script = subprocess.run(["scontrol", "show", "job", jobs["evaluate_job"]], capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{jobs['sample_job']}" in script  # queued behind the whole array
    wait_for([jobs["sample_job"], jobs["evaluate_job"]])
    run = tmp_path / "run"
    logs = sorted(p.name for p in (run / "slurm").glob("sample-*.out"))
    assert logs == [f"sample-{jobs['sample_job']}_{i}.out" for i in range(3)]
    assert shard_bytes(run) == shard_bytes(local_run)  # 6 shards, 2 per task, the same bytes
    ours, theirs = (json.loads((r / "metrics.json").read_text()) for r in (run, local_run))
    assert {k: ours[k] for k in ("fid", "precision", "recall", "accuracy", "num_samples", "complete")} == \
        {k: theirs[k] for k in ("fid", "precision", "recall", "accuracy", "num_samples", "complete")}
    assert (run / "summary.csv").is_file() and (run / "grid.png").is_file()


@pytest.mark.slurm
def test_a_task_signalled_before_its_time_limit_requeues_and_completes_the_same_bytes(slurm_cluster, local_run,
                                                                                      tmp_path):
    run = tmp_path / "run"
    jobs = submit(tmp_path, run, "--tasks", "1")
    task = f"{jobs['sample_job']}_0"
    deadline = time.time() + 600
    while not list((run / "shards").glob("shard-*.npz")) if (run / "shards").is_dir() else True:
        assert time.time() < deadline, "no shard was written"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", task], check=True)  # what --signal=USR1@120 sends
    deadline = time.time() + 300  # the task stops at its next batch
    requeued = ("Restarts=1", "JobState=PENDING")
    while not all(k in (state := subprocess.run(["scontrol", "show", "job", task], capture_output=True,
                                                text=True).stdout) for k in requeued) and time.time() < deadline:
        time.sleep(0.2)
    assert all(k in state for k in requeued), state  # requeued by the task itself
    subprocess.run(["scontrol", "update", f"jobid={task}", "StartTime=now"], check=True)  # skip Slurm's requeue delay
    wait_for([jobs["sample_job"], jobs["evaluate_job"]])
    log = (run / "slurm" / f"sample-{task}.out").read_text()
    assert "SIGUSR1: requeue of job" in log and "(restart 1)" in log
    assert shard_bytes(run) == shard_bytes(local_run)
    assert json.loads((run / "metrics.json").read_text())["fid"] == \
        json.loads((local_run / "metrics.json").read_text())["fid"]


def test_logger_and_evaluation_overrides_go_to_the_evaluation_job_only(tmp_path, capsys):
    from guidebench.cli.submit import submit as submit_jobs

    submit_jobs(["--dry-run", "--tasks", "2", "--out", str(tmp_path / "run"), "--", "guidance=cfg", "sampling.shard_size=500", "logger=wandb",
                 "logger.wandb.group=g", "evaluation.batch_size=50"])
    sample_call, evaluate_call = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ sbatch")]
    assert "sample.sbatch" in sample_call and "guidance=cfg" in sample_call
    assert not any(arg.startswith(("logger", "evaluation.")) for arg in sample_call.split())
    assert "evaluate.sbatch" in evaluate_call and "logger=wandb" in evaluate_call
    assert "logger.wandb.group=g" in evaluate_call and "evaluation.batch_size=50" in evaluate_call


def test_submit_refuses_bad_overrides_before_queueing_anything(tmp_path, capsys):
    from guidebench.cli.submit import submit as submit_jobs

    for args, error in [(["--", "guidance=nope"], "do not compose"),
                        (["--tasks", "9", "--", "sampling.num_samples=48", "sampling.shard_size=8"],
                         "exceeds the run's 6 shards")]:
        with pytest.raises(SystemExit):
            submit_jobs(["--dry-run", "--out", str(tmp_path / "run"), *args])
        assert error in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
