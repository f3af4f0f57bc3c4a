"""The same shard bytes for any world size and batch size: torchrun (gloo on CPU) with 2 and 3 processes,
batch sizes 4 and 7, against one process; each shard's record names the process that wrote it."""

import json
import subprocess

import pytest

from guidebench.manifest import check_run
from guidebench.shards import list_shards, shard_name
from tests.test_cli import BIN, ENV

NUM_SAMPLES, SHARD_SIZE = 48, 8
COMMON = ["backbone=digits", "guidance=cfg", f"sampling.shard_size={SHARD_SIZE}", "sampling.device=cpu",
          "sampler.schedule.respacing=ddim10"]


def shard_bytes(run):
    return {p.name: p.read_bytes() for p in list_shards(run)}


def writers(run):
    """(process, processes) of every shard's record, in shard order."""
    return [(r["process"], r["processes"]) for r in
            (json.loads(p.with_suffix(".json").read_text()) for p in list_shards(run))]


def sample(processes, *overrides, cwd):
    """guidebench-sample in one process, or under torchrun in `processes` (one thread each)."""
    launcher = [str(BIN / "guidebench-sample")] if processes == 1 else \
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(processes), "-m", "guidebench.cli.sample"]
    proc = subprocess.run([*launcher, *COMMON, *overrides, f"hydra.run.dir={cwd / 'h'}"], cwd=cwd,
                          env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(launcher)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Shard bytes of one process with batch size 4."""
    tmp = tmp_path_factory.mktemp("one")
    sample(1, f"sampling.num_samples={NUM_SAMPLES}", "sampling.batch_size=4", f"sampling.out_dir={tmp / 'run'}",
           cwd=tmp)
    assert writers(tmp / "run") == [(0, 1)] * (NUM_SAMPLES // SHARD_SIZE)
    return shard_bytes(tmp / "run")


def test_batch_size_does_not_change_the_bytes(one_process, tmp_path):
    """Batch 7 splits every shard of 8 into batches of 7 and 1; batch 4 into two of 4."""
    sample(1, f"sampling.num_samples={NUM_SAMPLES}", "sampling.batch_size=7", f"sampling.out_dir={tmp_path / 'run'}",
           cwd=tmp_path)
    assert shard_bytes(tmp_path / "run") == one_process


@pytest.mark.slow
def test_two_torchrun_processes_write_the_bytes_of_one(one_process, tmp_path):
    run = tmp_path / "run"
    sample(2, f"sampling.num_samples={NUM_SAMPLES}", "sampling.batch_size=4", f"sampling.out_dir={run}", cwd=tmp_path)
    assert writers(run) == [(k % 2, 2) for k in range(NUM_SAMPLES // SHARD_SIZE)]  # process r: shards r, r + 2, ...
    assert shard_bytes(run) == one_process and check_run(run).clean


@pytest.mark.slow
def test_three_processes_over_four_shards(one_process, tmp_path):
    """A world size that does not divide the shard count: process 0 writes shards 0 and 3, the others one each.
    Shard k holds samples [k S, (k + 1) S) whatever num_samples is: these are the first 4 shards of one_process."""
    run = tmp_path / "run"
    sample(3, f"sampling.num_samples={4 * SHARD_SIZE}", "sampling.batch_size=7", f"sampling.out_dir={run}",
           cwd=tmp_path)
    assert writers(run) == [(0, 3), (1, 3), (2, 3), (0, 3)]
    assert shard_bytes(run) == {shard_name(k): one_process[shard_name(k)] for k in range(4)}
    assert check_run(run).clean
