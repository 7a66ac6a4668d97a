"""End-to-end DP fine-tuning on a tiny real pipeline and real MNIST shards: every adapter kind, the
ledger, resume equivalence, budget refusal, NOT PRIVATE markers, the latent cache."""
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpldm.errors import DpldmError, PrivacyBudgetExceeded
from dpldm.privacy import accountant as acc
from dpldm.train import finetune as ft
from tiny import finetune_config, make_mnist_shards, make_tiny_pipeline


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_assets")
    return make_tiny_pipeline(root / "pipe"), make_mnist_shards(root / "mnist", n=64)


def adapter_weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter.safetensors"))


@pytest.mark.parametrize("kind", ["loda", "lora", "attention", "full"])
def test_each_adapter_kind_trains_and_writes_ledger(tmp_path, assets, kind):
    pipe, shards = assets
    cfg = finetune_config(tmp_path, pipe, shards, **{"adapter.kind": kind, "train.steps": 2})
    run = ft.run_finetune(cfg)
    ledger = json.loads((run / "privacy.json").read_text())
    for key in ("epsilon", "delta", "target_epsilon", "accountant", "noise_multiplier", "sample_rate", "steps",
                "max_grad_norm", "noise_multiplicity", "dataset_size", "sampling", "private"):
        assert key in ledger, key
    assert ledger["private"] is True and ledger["sampling"] == "poisson"
    assert ledger["dataset_size"] == 64 and ledger["steps"] == 2
    assert ledger["sample_rate"] == pytest.approx(16 / 64)
    assert ledger["noise_multiplicity"] == 2
    # epsilon is what an independent accountant gives for the recorded (sigma, q, steps)
    independent = acc.epsilon(ledger["noise_multiplier"], 0.25, 2, 1e-5, "dpa_rdp")
    assert ledger["epsilon"] == pytest.approx(independent, rel=0.05)
    assert 0 < ledger["epsilon"] <= 50.0 * (1 + 1e-6)
    assert (run / "config.yaml").exists() and (run / "adapter" / "adapter_config.json").exists()
    weights = adapter_weights(run)
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    if kind in ("loda", "lora"):  # B starts at zero: training must have moved it
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "B" in k.split(".")[-2] or "up" in k)


def test_resume_after_signal_equals_uninterrupted(tmp_path, assets, monkeypatch):
    pipe, shards = assets
    over = {"train.steps": 4, "train.checkpoint_every": 100, "privacy.noise_multiplier": 1.0}
    ft.run_finetune(finetune_config(tmp_path, pipe, shards, "whole", **over))

    original = ft.FinetuneTrainer.train_step

    def interrupted(self, step):
        out = original(self, step)
        if step == 1:
            self._stop_signal = signal.SIGUSR1  # as if SLURM warned of the time limit
        return out
    monkeypatch.setattr(ft.FinetuneTrainer, "train_step", interrupted)
    cfg = finetune_config(tmp_path, pipe, shards, "split", **over)
    with pytest.raises(SystemExit) as stop:
        ft.run_finetune(cfg)
    assert stop.value.code == 75
    mid = json.loads((tmp_path / "split" / "privacy.json").read_text())
    assert mid["steps"] == 2
    monkeypatch.setattr(ft.FinetuneTrainer, "train_step", original)
    ft.run_finetune(cfg)

    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = json.loads((tmp_path / "whole" / "privacy.json").read_text())
    lb = json.loads((tmp_path / "split" / "privacy.json").read_text())
    assert lb["steps"] == la["steps"] == 4
    assert lb["epsilon"] == pytest.approx(la["epsilon"])
    # the history before the interruption is kept unchanged
    assert lb["history"][0]["step"] == 2 and lb["history"][0]["epsilon"] == pytest.approx(mid["epsilon"])


def test_refuses_to_exceed_budget(tmp_path, assets):
    pipe, shards = assets
    cfg = finetune_config(tmp_path, pipe, shards, **{"privacy.noise_multiplier": 0.6, "privacy.target_epsilon": 1.0,
                                                      "train.steps": 50})
    with pytest.raises(PrivacyBudgetExceeded):
        ft.run_finetune(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_changed_privacy_settings_is_refused(tmp_path, assets):
    pipe, shards = assets
    ft.run_finetune(finetune_config(tmp_path, pipe, shards, **{"train.steps": 1, "privacy.noise_multiplier": 2.0}))
    with pytest.raises(DpldmError, match="noise_multiplier"):
        ft.run_finetune(finetune_config(tmp_path, pipe, shards, **{"train.steps": 2, "privacy.noise_multiplier": 1.0}))


def test_clip_groups_recorded_checked_and_label_index_prompts(tmp_path, assets):
    """privacy.clip_groups reaches the ledger, a pattern that selects nothing is a one-line error, a resume
    with other groups is refused; with no class_names the run keeps the pipeline's own class prompts."""
    pipe, shards = assets
    groups = {"privacy.clip_groups": ["attn2"], "train.steps": 1, "model.class_names": []}
    run = ft.run_finetune(finetune_config(tmp_path, pipe, shards, **groups))
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["clip_groups"] == ["attn2"] and ledger["private"]
    pipeline_meta = json.loads((pipe / "dpldm.json").read_text())
    classes = json.loads((run / "classes.json").read_text())
    assert classes["class_names"] == pipeline_meta["class_names"] and classes["source"] == "pipeline"
    with pytest.raises(DpldmError, match="clip_groups"):
        ft.run_finetune(finetune_config(tmp_path, pipe, shards, **{**groups, "train.steps": 2,
                                                                   "privacy.clip_groups": ["attn1"]}))
    with pytest.raises(DpldmError, match=r"privacy.clip_groups: 'no_such_layer' matches no trainable"):
        ft.run_finetune(finetune_config(tmp_path, pipe, shards, "other", **{
            **groups, "privacy.clip_groups": ["no_such_layer"]}))


def test_sigma_zero_is_marked_not_private(tmp_path, assets, capsys):
    pipe, shards = assets
    ft.run_finetune(finetune_config(tmp_path, pipe, shards, **{"train.steps": 1, "privacy.noise_multiplier": 0.0}))
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert ledger["private"] is False
    assert any("NOT PRIVATE" in w for w in ledger["warnings"])
    assert "NOT PRIVATE" in capsys.readouterr().out


def test_non_private_baseline_runs_identical_loop(tmp_path, assets):
    pipe, shards = assets
    run = ft.run_finetune(finetune_config(tmp_path, pipe, shards, **{"train.steps": 2, "privacy.enabled": False}))
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["private"] is False and any("NOT PRIVATE" in w for w in ledger["warnings"])
    assert adapter_weights(run)


def test_plain_and_per_example_paths_agree_without_clipping(tmp_path, assets):
    """The No-DP loop (ordinary backprop) and the DP loop with C=inf, sigma=0 give the same update."""
    pipe, shards = assets
    # SGD: Adam's g/(|g|+eps) would amplify float rounding of near-zero gradients into visible differences
    common = {"train.steps": 2, "privacy.max_grad_norm": 1e9, "privacy.noise_multiplier": 0.0, "optim.name": "sgd"}
    a = ft.run_finetune(finetune_config(tmp_path, pipe, shards, "dp", **common))
    b = ft.run_finetune(finetune_config(tmp_path, pipe, shards, "nodp", **{**common, "privacy.enabled": False}))
    wa, wb = adapter_weights(a), adapter_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_latent_cache_reused_and_rebuilt_when_stale(tmp_path, assets):
    from dpldm.data.latent_cache import ensure_cache
    from dpldm.models.pipeline import load_pipeline
    pipe, shards = assets
    cfg = finetune_config(tmp_path, pipe, shards)
    comps = load_pipeline(pipe)
    cache = ensure_cache(cfg, comps.vae)
    assert len(cache) == 64 and cache.latent_shape == (4, 8, 8)
    assert sorted(np.bincount(cache.labels, minlength=10)) and (cache.labels >= 0).all()
    stamp = (cache.path / "latents.npy").stat().st_mtime_ns
    assert (ensure_cache(cfg, comps.vae).path / "latents.npy").stat().st_mtime_ns == stamp  # reused
    with torch.no_grad():
        next(comps.vae.parameters()).add_(0.1)  # a different encoder: the cache is stale
    rebuilt = ensure_cache(cfg, comps.vae)
    assert rebuilt.meta["encoder"] != cache.meta["encoder"]
    assert not np.allclose(np.asarray(rebuilt.latents), np.asarray(cache.latents))


def test_batchnorm_model_is_rejected(tmp_path, assets):
    from dpldm.privacy.dp_step import assert_dp_compatible
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(DpldmError, match="BatchNorm"):
        assert_dp_compatible(model)


def test_training_gives_the_signals_back_and_acts_on_one_that_came_after_the_last_check(tmp_path, assets,
                                                                                        monkeypatch):
    """After fit() the process's own SIGTERM/SIGUSR1 handlers are back (a preemption signal during the sampling
    that follows a fine-tune must not be swallowed by a finished trainer), and a signal that arrived after the
    last step's check (during the final checkpoint) is delivered to them, not forgotten."""
    pipe, shards = assets
    received = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        term = signal.getsignal(signal.SIGTERM)
        original = ft.FinetuneTrainer.save_checkpoint

        def save_then_signal(self):
            original(self)
            self._stop_signal = signal.SIGUSR1      # as if SLURM's warning came during the final write
        monkeypatch.setattr(ft.FinetuneTrainer, "save_checkpoint", save_then_signal)
        run = ft.run_finetune(finetune_config(tmp_path, pipe, shards, **{"train.steps": 1}))
        assert json.loads((run / "privacy.json").read_text())["steps"] == 1
        assert received == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGTERM) == term
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_quickstart_moves_a_run_made_with_other_settings_aside_with_its_ledger(tmp_path, assets):
    """`dpldm quickstart` after an edit of configs/quickstart.yaml must not resume (and report) the old run."""
    from dpldm.recipes.quickstart import finetuned
    pipe, shards = assets
    first = finetuned(finetune_config(tmp_path, pipe, shards, **{"train.steps": 1}))
    ledger = (first / "privacy.json").read_text()
    assert finetuned(finetune_config(tmp_path, pipe, shards, **{"train.steps": 1})) == first   # same settings: kept
    assert not (tmp_path / "run.stale-1").exists()
    again = finetuned(finetune_config(tmp_path, pipe, shards, **{"train.steps": 1, "optim.lr": 3e-2}))
    assert again == first and (tmp_path / "run.stale-1" / "privacy.json").read_text() == ledger
    assert json.loads((again / "privacy.json").read_text())["steps"] == 1
    old, new = adapter_weights(tmp_path / "run.stale-1"), adapter_weights(again)       # trained afresh at lr 3e-2
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_quickstart_moves_a_run_aside_when_its_pretrained_weights_changed(tmp_path, assets):
    """Same config, same pipeline folder, another pretraining budget written there: the old fine-tune (and its
    samples) must not be resumed and reported as if it came from the new weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dpldm.recipes.quickstart import finetuned
    pipe, shards = assets
    pipe = Path(shutil.copytree(pipe, tmp_path / "pipe"))
    cfg = finetune_config(tmp_path, pipe, shards, **{"train.steps": 1})
    first = finetuned(cfg)
    assert finetuned(cfg) == first and not (tmp_path / "run.stale-1").exists()       # same weights: resumed
    weights = next((pipe / "unet").glob("*.safetensors"))
    save_file({k: v + 0.01 for k, v in load_file(str(weights)).items()}, str(weights))   # "pretrained longer"
    assert finetuned(cfg) == first and (tmp_path / "run.stale-1" / "privacy.json").is_file()


def test_an_rgb_pipeline_fine_tunes_on_gray_shards_whatever_the_preset_says(tmp_path, assets, capsys):
    """A preset's model.channels=1 must not win over the RGB Stable-Diffusion-layout folder the user points at."""
    _, shards = assets
    rgb = make_tiny_pipeline(tmp_path / "rgb_pipe", channels=3)
    run = ft.run_finetune(finetune_config(tmp_path, rgb, shards, **{"train.steps": 1, "model.channels": 1}))
    assert json.loads((run / "privacy.json").read_text())["steps"] == 1
    assert "takes 3-channel images" in capsys.readouterr().out
    with pytest.raises(DpldmError, match=r"model.resolution=15 must be a multiple of the autoencoder's downsampling "
                                         r"factor 2"):
        ft.run_finetune(finetune_config(tmp_path, rgb, shards, "odd", **{"train.steps": 1, "model.resolution": 15}))


def test_adapter_ema_is_published_resumes_exactly_and_differs_from_the_last_iterate(tmp_path, assets, monkeypatch):
    """train.ema_decay: the published adapter is the iterate average (post-processing), checkpointed with the run."""
    pipe, shards = assets
    over = {"train.steps": 4, "train.checkpoint_every": 100, "privacy.noise_multiplier": 1.0, "train.ema_decay": 0.5,
            "optim.decay": "cosine", "optim.warmup_steps": 1}
    whole = ft.run_finetune(finetune_config(tmp_path, pipe, shards, "whole", **over))
    original = ft.FinetuneTrainer.train_step

    def interrupted(self, step):
        out = original(self, step)
        if step == 1:
            self._stop_signal = signal.SIGUSR1
        return out
    monkeypatch.setattr(ft.FinetuneTrainer, "train_step", interrupted)
    cfg = finetune_config(tmp_path, pipe, shards, "split", **over)
    with pytest.raises(SystemExit):
        ft.run_finetune(cfg)
    monkeypatch.setattr(ft.FinetuneTrainer, "train_step", original)
    split = ft.run_finetune(cfg)
    a, b = adapter_weights(whole), adapter_weights(split)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    last = sorted((whole / "checkpoints").glob("step-*"))[-1]
    assert (last / "ema.safetensors").is_file()
    iterate = load_file(str(last / "trainable.safetensors"))
    moved = [k for k in a if k.endswith("B.weight") or ".up." in k]
    assert moved and any(not torch.allclose(a[k], iterate[k]) for k in iterate if k in a)


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    from dpldm.config import OptimConfig
    from dpldm.distributed.optim import lr_at
    cfg = OptimConfig(lr=1.0, warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(x >= y for x, y in zip(lrs[4:], lrs[5:]))
    assert lr_at(OptimConfig(lr=0.3), 7, 20) == 0.3                       # flat by default


def test_ghost_and_vmap_clipping_engines_train_the_same_adapter(tmp_path, assets, capsys):
    """privacy.clipping: the book-keeping engine and torch.func give one clipped sum, so one update (σ = 0,
    clipping active, K = 2, clip groups); the run log names the engine."""
    pipe, shards = assets
    common = {"train.steps": 2, "privacy.noise_multiplier": 0.0, "privacy.max_grad_norm": 0.01,
              "privacy.clip_groups": ["attn2"], "optim.name": "sgd", "optim.lr": 0.5}
    runs = {e: ft.run_finetune(finetune_config(tmp_path, pipe, shards, e, **{**common, "privacy.clipping": e}))
            for e in ("ghost", "vmap")}
    out = capsys.readouterr().out
    assert "clipping engine: ghost" in out and "clipping engine: vmap" in out
    a, b = adapter_weights(runs["ghost"]), adapter_weights(runs["vmap"])
    assert any(v.abs().sum() > 0 for k, v in a.items() if "loda_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
