"""Work split (shard ranges, array tasks) and runs killed at any moment: a rerun writes only what is missing
and the finished set is byte-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import time

import pytest

from guidebench.manifest import check_run
from guidebench.sampling import assigned_shards
from guidebench.shards import list_shards
from tests.test_cli import BIN, ENV, cli

COMMON = ["backbone=digits", "guidance=none", "sampling.num_samples=48", "sampling.shard_size=8",
          "sampling.batch_size=4", "sampling.device=cpu", "sampler.schedule.respacing=ddim10"]


def shard_bytes(run):
    return {p.name: p.read_bytes() for p in list_shards(run)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    cli("guidebench-sample", *COMMON, f"sampling.out_dir={tmp / 'run'}", f"hydra.run.dir={tmp / 'h'}", cwd=tmp)
    return shard_bytes(tmp / "run")


@pytest.mark.parametrize("num_shards, shard_range, tasks", [(10, None, 3), (7, [2, 7], 2), (4, None, 6), (1, None, 1)])
def test_array_tasks_and_processes_partition_the_shards(num_shards, shard_range, tasks):
    a, b = shard_range or (0, num_shards)
    parts = [assigned_shards(num_shards, shard_range, t, tasks) for t in range(tasks)]
    assert sum(parts, []) == list(range(a, b))  # contiguous parts, in order, each shard once
    for part, t in zip(parts, range(tasks)):
        dealt = [assigned_shards(num_shards, shard_range, t, tasks, r, 2) for r in range(2)]
        assert sorted(sum(dealt, [])) == part and dealt[0] == part[0::2]


def test_bad_split_names_the_keys():
    with pytest.raises(ValueError, match=r"shard_range=\[3, 9\) must lie within the run's 8 shards"):
        assigned_shards(8, [3, 9])
    with pytest.raises(ValueError, match="sampling.task=3 must be in 0..sampling.tasks - 1 = 2"):
        assigned_shards(8, None, 3, 3)


def test_array_tasks_complete_the_set_one_by_one(uninterrupted, tmp_path):
    run = tmp_path / "run"
    for task in (2, 0):
        cli("guidebench-sample", *COMMON, "sampling.tasks=3", f"sampling.task={task}", f"sampling.out_dir={run}",
            f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert sorted(shard_bytes(run)) == ["shard-000000.npz", "shard-000001.npz", "shard-000004.npz", "shard-000005.npz"]
    status = check_run(run)
    assert not status.clean and "[16, 32)" in status.message()
    assert "guidebench-sample" in status.message() and "sampling.task" not in status.message()
    cli("guidebench-sample", *COMMON, "sampling.tasks=3", "sampling.task=1", f"sampling.out_dir={run}",
        f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert shard_bytes(run) == uninterrupted and check_run(run).clean


def start_and_interrupt(run, tmp_path, signum):
    """Start guidebench-sample, send `signum` once its first shard is written; return the exit code."""
    proc = subprocess.Popen([str(BIN / "guidebench-sample"), *COMMON, f"sampling.out_dir={run}",
                             f"hydra.run.dir={tmp_path / 'h'}"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((run / "shards").glob("shard-*.npz")) if (run / "shards").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    time.sleep(0.3)  # mid-way through the next shard
    os.kill(proc.pid, signum)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL], ids=["TERM", "USR1", "KILL"])
def test_a_killed_run_resumes_to_the_same_bytes(uninterrupted, tmp_path, signum):
    run = tmp_path / "run"
    code, err = start_and_interrupt(run, tmp_path, signum)
    finished = shard_bytes(run)
    assert 0 < len(finished) < len(uninterrupted), "the signal came after the run had finished"
    assert all(uninterrupted[name] == data for name, data in finished.items())
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # stopped between batches, exit code 128 + signum, finished shards listed in the manifest
        assert code == 128 + signum and "abandoned" in err
        listed = [s["file"] for s in json.loads((run / "run.json").read_text())["shards"]]
        assert sorted(listed) == sorted(finished)
    mtimes = {p.name: p.stat().st_mtime_ns for p in list_shards(run)}
    cli("guidebench-sample", *COMMON, f"sampling.out_dir={run}", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert shard_bytes(run) == uninterrupted and check_run(run).clean
    assert {p.name: p.stat().st_mtime_ns for p in list_shards(run) if p.name in mtimes} == mtimes  # kept, not redone
