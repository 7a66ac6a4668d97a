"""Multi-process DP training over gloo: 2 ranks == 1 rank (plain torch and ZeRO 1/2/3), noise once
globally, checkpoints that resume on another world size; plus rank discovery from torchrun/SLURM env."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpldm.distributed import env as denv
from dpldm.errors import DpldmError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
sys.path.insert(0, str(ROOT / "tests"))
import dist_worker  # noqa: E402

ENGINES = list(dist_worker.ENGINES)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One 1-process run and one 2-process torchrun run (which also resumes the 1-process checkpoint)."""
    tmp = tmp_path_factory.mktemp("dist")
    py = sys.executable
    _run([py, str(WORKER), "--out", str(tmp / "one")], tmp)
    _run([py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          str(WORKER), "--out", str(tmp / "two"), "--resume-from", str(tmp / "one")], tmp)
    load = lambda p: torch.load(p, weights_only=False)  # noqa: E731
    return load(tmp / "one/rank0.pt"), load(tmp / "two/rank0.pt"), load(tmp / "two/rank1.pt")


def _maxdiff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_match_one_rank_with_clipping_and_sigma0(results, engine):
    one, r0, r1 = results
    w1, w2 = one[engine]["sigma0"]["weights"], r0[engine]["sigma0"]["weights"]
    assert _maxdiff(w1, w2) < 1e-5
    assert _maxdiff(r0[engine]["sigma0"]["weights"], r1[engine]["sigma0"]["weights"]) == 0.0  # replicas agree
    torch.manual_seed(0)
    init = {k: p for k, p in dist_worker.TinyNet().named_parameters() if p.requires_grad}
    assert _maxdiff(w1, {k: v.detach() for k, v in init.items()}) > 1e-2                       # it trained
    assert set(w1) == {"body.weight", "body.bias", "head.weight", "head.bias"}                 # frozen stem excluded


@pytest.mark.parametrize("engine", ENGINES)
def test_noise_enters_once_globally(results, engine):
    """With sigma > 0 the 2-rank run equals the 1-rank run (same noise, added once, not per rank, and not
    rescaled by DeepSpeed's gradient averaging), and the injected noise has std sigma*C/B on both."""
    one, r0, r1 = results
    assert _maxdiff(one[engine]["sigma"]["weights"], r0[engine]["sigma"]["weights"]) < 1e-5
    assert _maxdiff(one[engine]["sigma"]["weights"], one[engine]["sigma0"]["weights"]) > 1e-2   # noise mattered
    target = dist_worker.SIGMA * dist_worker.C / dist_worker.EXPECTED_BS
    for res in (one, r0, r1):
        noise = res[engine]["sigma"]["noise"]
        assert abs(noise.std().item() / target - 1) < 0.1
    assert torch.equal(r0[engine]["sigma"]["noise"], r1[engine]["sigma"]["noise"])


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoint_from_one_rank_resumes_on_two(results, engine):
    one, r0, r1 = results
    for r in (r0, r1):
        assert _maxdiff(r[engine]["resumed"]["weights"], one[engine]["sigma0"]["weights"]) < 1e-5
    state = one[engine]["sigma0"]["ckpt"]["engine"]
    if engine != "torch":       # DeepSpeed state is saved unpartitioned: full shapes, any world size
        assert state["params"]["head.weight"].shape == (3, 144)
        assert state["optimizer"]["head.weight"]["exp_avg"].shape == (3, 144)


# --- rank discovery -------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,7],login1", ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]),
    ("a[1-2]-ib[3-4]", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]),
    ("single", ["single"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert denv.expand_nodelist(nodelist) == hosts


def test_bad_nodelist_is_a_user_error():
    with pytest.raises(DpldmError, match="SLURM_JOB_NODELIST"):
        denv.expand_nodelist("node[a-b]")


def _clean(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k, raising=False)


def test_discover_env_from_slurm_sets_rendezvous(monkeypatch):
    _clean(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    e = denv.discover_env()
    assert (e.rank, e.world_size, e.local_rank, e.is_main, e.source) == (3, 4, 1, False, "slurm")
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 10000)
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "4" and os.environ["LOCAL_RANK"] == "1"


def test_torchrun_env_wins_and_batch_script_is_single(monkeypatch):
    _clean(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "0")           # inside the sbatch script, outside srun: no step id
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert denv.discover_env().world_size == 1
    monkeypatch.setenv("SLURM_STEP_ID", str(0xFFFFFFFE))   # the batch step's reserved id
    assert denv.discover_env().world_size == 1
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    e = denv.discover_env()
    assert (e.rank, e.world_size, e.local_rank, e.source) == (1, 2, 1, "torchrun")


def test_init_distributed_without_rendezvous_is_a_user_error(monkeypatch):
    _clean(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DpldmError, match="MASTER_ADDR"):
        denv.init_distributed("gloo")


def test_deepspeed_config_bf16_auto_and_bad_configs(tmp_path):
    from dpldm.distributed.deepspeed_engine import load_deepspeed_config
    for stage in (1, 2, 3):
        cfg = load_deepspeed_config(str(ROOT / f"configs/deepspeed/zero{stage}.json"))
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["bf16"]["enabled"] is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    bad = tmp_path / "bad.json"
    for text, needle in (("{", "not valid JSON"), ('{"zero_optimization": {"stage": 0}}', "stage must be 1, 2 or 3"),
                         ('{"zero_optimization": {"stage": 2}, "fp16": {"enabled": true}}', "fp16"),
                         ('{"zero_optimization": {"stage": 2}, "optimizer": {}}', "optimizer")):
        bad.write_text(text)
        with pytest.raises(DpldmError, match=needle):
            load_deepspeed_config(str(bad))
    with pytest.raises(DpldmError, match="does not exist"):
        load_deepspeed_config(str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_dpldm_finetune_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 dpldm finetune` == one process (σ=0, clipping on): same adapter.
    SGD, because Adam's m/sqrt(v) amplifies float-summation-order differences in near-zero gradients."""
    from safetensors.torch import load_file

    from dpldm.config import save_config
    from dpldm.train import finetune as ft
    from tiny import finetune_config, make_mnist_shards, make_tiny_pipeline
    pipe, shards = make_tiny_pipeline(tmp_path / "pipe"), make_mnist_shards(tmp_path / "mnist", n=64)
    cfg = finetune_config(tmp_path, pipe, shards, "one", **{"privacy.noise_multiplier": 0.0, "train.steps": 2,
                                                             "optim.name": "sgd", "optim.lr": 0.5})
    ft.run_finetune(cfg)                                    # one process, in this interpreter
    save_config(cfg, tmp_path / "ft.yaml")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(_free_port()), str(Path(sys.executable).parent / "dpldm"), "finetune", str(tmp_path / "ft.yaml"),
          f"output.dir={tmp_path / 'two'}"], tmp_path)
    one = load_file(str(tmp_path / "one/adapter/adapter.safetensors"))
    two = load_file(str(tmp_path / "two/adapter/adapter.safetensors"))
    assert one.keys() == two.keys() and len(one) > 0
    assert _maxdiff(one, two) < 1e-5
    assert max(v.abs().max().item() for k, v in one.items() if "loda_B" in k) > 0
    ledger = json.loads((tmp_path / "two/privacy.json").read_text())
    assert ledger["steps"] == 2 and ledger["private"] is False     # σ=0 is marked NOT PRIVATE
