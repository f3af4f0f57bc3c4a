"""Stop sampling cleanly on SLURM's preemption and time-limit signals, and requeue.

SLURM sends SIGTERM when it preempts or cancels a job, and the signal asked for with `--signal=USR1@SECONDS`
before the time limit. `Preemption` turns either into a request that the sampling loop honours between batches:
the shard being sampled is abandoned (only finished shards exist, each written atomically), and the process
exits with 128 + the signal's number. On SIGUSR1 inside a SLURM job it first requeues the job
(`scontrol requeue`) and waits for SLURM to stop it, so the job starts again and, finding its finished shards,
samples only the rest.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_WAIT = 120  # seconds to wait, after asking for a requeue, for SLURM to stop this job itself


class Preempted(SystemExit):
    """Raised by `Preemption.check`: the process stops with exit code 128 + signum."""


def slurm_job_id() -> str | None:
    """This task's SLURM id (`ARRAYJOB_TASK` for an array task), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


class Preemption:
    """`with Preemption() as stop: ... stop.check()`: raise `Preempted` at the next check after a signal."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        job = slurm_job_id()
        log.warning("%s: the shard in progress is abandoned; finished shards are kept and a rerun samples the rest",
                    name)
        if self.signum == signal.SIGUSR1 and job:
            requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            log.warning("%s: requeue of job %s %s", name, job,
                        "asked" if requeued.returncode == 0 else f"failed: {requeued.stderr.strip()}")
            if requeued.returncode == 0:  # let SLURM end the job as its requeue does: an exit of our own races with
                time.sleep(REQUEUE_WAIT)  # it and can fail the job's afterok dependents for good
        raise Preempted(128 + self.signum)
