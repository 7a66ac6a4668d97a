"""launchers/slurm.py without a cluster: the rendered sbatch script, argument checks, dry run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpldm.errors import DpldmError
from launchers import slurm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output:\n  dir: runs/from-yaml\ntrain:\n  steps: 3\n")
    return path


def _directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def test_gpu_job_has_one_task_per_gpu_requeue_and_signal(config, tmp_path):
    text, run_dir = slurm.render(str(config), ["output.dir=runs/x", "privacy.target_epsilon=2"], nodes=3,
                                 gpus_per_node=4, cpus_per_task=8, partition="gpu", time="04:00:00",
                                 account="proj1", workdir=tmp_path)
    d = _directives(text)
    assert d["nodes"] == "3" and d["ntasks-per-node"] == "4" and d["gpus-per-node"] == "4"
    assert d["cpus-per-task"] == "8" and d["partition"] == "gpu" and d["time"] == "04:00:00"
    assert d["account"] == "proj1" and "requeue" in d and d["signal"] == "B:USR1@120"
    assert run_dir == tmp_path / "runs/x"                      # the override wins over the YAML
    assert d["output"] == f"{run_dir}/slurm-%j.out"
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert " finetune " in srun and f"output.dir={run_dir}" in srun and "privacy.target_epsilon=2" in srun
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert f'"$rc" -eq {slurm.EXIT_PREEMPTED} ] && [ "$REQUEUE" -eq 1 ]' in text   # requeue only after USR1
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "REQUEUE=1; kill -USR1" in text
    script = tmp_path / "job.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0   # valid bash


def test_cpu_job_has_one_task_per_node_and_no_gpu_request(config, tmp_path):
    text, run_dir = slurm.render(str(config), [], nodes=2, gpus_per_node=0, workdir=tmp_path,
                                 verb="pretrain:unet")
    d = _directives(text)
    assert d["ntasks-per-node"] == "1" and "gpus-per-node" not in d and "partition" not in d
    assert run_dir == tmp_path / "runs/from-yaml"
    assert " pretrain unet " in next(line for line in text.splitlines() if line.startswith("srun "))


def test_resources_default_to_the_configs_distributed_fields(config, tmp_path):
    text, _ = slurm.render(str(config), ["distributed.nodes=5", "distributed.gpus_per_node=2",
                                         "distributed.partition=big", "distributed.time=01:00:00"],
                           workdir=tmp_path, time="00:30:00")
    d = _directives(text)
    assert d["nodes"] == "5" and d["ntasks-per-node"] == "2" and d["partition"] == "big"
    assert d["time"] == "00:30:00"                                 # a flag beats the config


@pytest.mark.parametrize("kwargs, needle", [
    ({"nodes": 0, "gpus_per_node": 1}, "--nodes"),
    ({"nodes": 1, "gpus_per_node": -1}, "--gpus-per-node"),
    ({"nodes": 1, "gpus_per_node": 1, "time": "four hours"}, "--time"),
    ({"nodes": 1, "gpus_per_node": 1, "partition": "gpu; rm -rf /"}, "--partition"),
])
def test_bad_arguments_are_one_line_errors(config, kwargs, needle):
    with pytest.raises(DpldmError, match=needle):
        slurm.render(str(config), [], **kwargs)


def test_bad_override_is_rejected_before_submitting(config):
    with pytest.raises(DpldmError, match="train.stepz"):
        slurm.render(str(config), ["train.stepz=3"], nodes=1, gpus_per_node=0)


def test_cli_dry_run_prints_script_and_writes_nothing(config, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launchers.slurm", "submit", str(config), "--nodes", "2",
                           "--gpus-per-node", "0", "--dry-run", f"output.dir={tmp_path}/run"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_cli_missing_config_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launchers.slurm", "submit", str(tmp_path / "nope.yaml"),
                           "--nodes", "1", "--gpus-per-node", "0", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
