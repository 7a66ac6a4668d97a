"""On a real two-node SLURM cluster (tests/slurm_cluster.py; root): gloo rendezvous from SLURM's env,
a 2-node DP fine-tune submitted through launchers/slurm.py, and cancel + resubmit resuming the run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import finetune_config, make_mnist_shards, make_tiny_pipeline

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("/tmp/dpldm-slurm-test/shared")     # "shared storage": the same filesystem on both nodes


def _job_env(cluster) -> dict:
    env = dict(cluster.env)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_node_gloo_all_reduce_with_dpldm_rank_discovery(slurm_cluster, tmp_path):
    """MASTER_ADDR/PORT are not exported: dpldm derives them from SLURM_JOB_NODELIST / SLURM_JOB_ID."""
    script = tmp_path / "allreduce.py"
    script.write_text(
        "import socket, torch\n"
        "from dpldm.distributed.env import init_distributed, all_reduce_sum_\n"
        "env = init_distributed('gloo')\n"
        "t = {'x': torch.tensor([float(env.rank + 1)])}\n"
        "all_reduce_sum_(t)\n"
        "print(f'rank {env.rank}/{env.world_size} {env.source} on {socket.gethostname()}: {t[\"x\"].item()}')\n")
    job = tmp_path / "job.sbatch"
    job.write_text(f"#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --time=00:05:00\n"
                   f"#SBATCH --output={tmp_path}/out-%j.txt\n#SBATCH --chdir={ROOT}\n"
                   f"unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE\n"
                   f"srun {sys.executable} {script}\n")
    job_id = slurm_cluster.sbatch(job)
    state = slurm_cluster.wait(job_id, timeout=180)
    out = (tmp_path / f"out-{job_id}.txt").read_text()
    assert state == "COMPLETED", out
    assert "rank 0/2 slurm on node1: 3.0" in out and "rank 1/2 slurm on node2: 3.0" in out, out


@pytest.fixture(scope="module")
def finetune_yaml():
    from dpldm.config import save_config
    SHARED.mkdir(parents=True, exist_ok=True)
    pipe = make_tiny_pipeline(SHARED / "pipe")
    shards = make_mnist_shards(SHARED / "mnist", n=64) if not (SHARED / "mnist").exists() else SHARED / "mnist"
    cfg = finetune_config(SHARED, pipe, shards, "unused", **{"privacy.noise_multiplier": 1.0,
                                                           "train.checkpoint_every": 1})
    path = SHARED / "finetune.yaml"
    save_config(cfg, path)
    return path


def _submit(cluster, config: Path, *overrides: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "launchers.slurm", "submit", str(config), "--nodes", "2",
                           "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "00:10:00", *overrides],
                          cwd=ROOT, env=_job_env(cluster), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[0]


def _log(run: Path, job: str) -> str:
    path = run / f"slurm-{job}.out"
    return path.read_text() if path.exists() else "(no log)"


def _wait(cluster, run: Path, job: str, timeout: float) -> str:
    """The job's terminal state; on a timeout, fails with the job's own log and the daemons' (a hang seen once in
    CI left nothing to read: the run dir was gone when the error was read)."""
    from slurm_cluster import ClusterError
    try:
        return cluster.wait(job, timeout=timeout)
    except ClusterError as e:
        pytest.fail(f"{e}\n--- job log\n{_log(run, job)}\n--- cluster\n{cluster.tail_logs()}")


def test_launcher_two_node_dp_finetune_completes_and_writes_ledger(slurm_cluster, finetune_yaml, tmp_path):
    run = tmp_path / "run"
    job = _submit(slurm_cluster, finetune_yaml, f"output.dir={run}", "train.steps=3")
    state = _wait(slurm_cluster, run, job, timeout=400)
    assert state == "COMPLETED", _log(run, job)
    assert (run / "slurm-job.sbatch").exists()
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["steps"] == 3 and ledger["private"] is True and ledger["epsilon"] > 0
    assert "ranks=2" in _log(run, job)
    assert (run / "adapter" / "adapter.safetensors").exists()


def test_cancelled_job_resubmitted_resumes_with_unchanged_ledger_history(slurm_cluster, finetune_yaml, tmp_path):
    run = tmp_path / "run"
    over = (f"output.dir={run}", "train.steps=12")
    job = _submit(slurm_cluster, finetune_yaml, *over)
    deadline = time.time() + 300
    while time.time() < deadline:               # cancel once a few checkpoints exist
        ledger = run / "privacy.json"
        if ledger.exists() and json.loads(ledger.read_text())["steps"] >= 3:
            break
        assert slurm_cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _log(run, job)
        time.sleep(0.5)
    slurm_cluster.scmd("scancel", job)
    assert slurm_cluster.wait(job, timeout=120) == "CANCELLED"
    before = json.loads((run / "privacy.json").read_text())
    assert 3 <= before["steps"] < 12, "the run finished before it could be cancelled"

    job2 = _submit(slurm_cluster, finetune_yaml, *over)
    state = _wait(slurm_cluster, run, job2, timeout=500)
    assert state == "COMPLETED", _log(run, job2)
    assert "resumed from" in _log(run, job2)
    after = json.loads((run / "privacy.json").read_text())
    assert after["steps"] == 12
    assert after["history"][:len(before["history"])] == before["history"]     # history before cancel kept
    assert all(h["step"] > before["steps"] for h in after["history"][len(before["history"]):])
    assert after["started"] == before["started"]


def test_usr1_before_time_limit_checkpoints_requeues_and_completes(slurm_cluster, finetune_yaml, tmp_path):
    """The `--signal=B:USR1@...` path: the batch shell forwards USR1, the trainer exits 75, the job requeues
    itself (same job id) and the requeued run resumes to the end."""
    run = tmp_path / "run"
    job = _submit(slurm_cluster, finetune_yaml, f"output.dir={run}", "train.steps=10")
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "privacy.json").exists()
                                          and json.loads((run / "privacy.json").read_text())["steps"] >= 2):
        time.sleep(0.5)
    slurm_cluster.scmd("scancel", "--signal=USR1", "--batch", job)      # what SLURM sends at the lead time
    deadline = time.time() + 500         # the requeued job waits out cred_expire (10 s here) and starts again
    out = ""
    while time.time() < deadline:
        out = slurm_cluster.scmd("scontrol", "show", "job", job, check=False).stdout
        if "Restarts=1" in out and any(f"JobState={s} " in out for s in ("COMPLETED", "FAILED", "CANCELLED")):
            break
        time.sleep(1)
    log = _log(run, job)
    assert "JobState=COMPLETED " in out, f"{log}\n{out}\n{slurm_cluster.tail_logs()}"
    assert "got USR1" in log and "requeueing job" in log and "resumed from" in log and "restart 1" in log
    assert json.loads((run / "privacy.json").read_text())["steps"] == 10
