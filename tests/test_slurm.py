"""A sweep submitted to a real (single-node, local) Slurm cluster as an array job."""

import json
import os
import shutil
import subprocess
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
