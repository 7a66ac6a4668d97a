"""`dpldm tune-proxy --fast`: settings are compared on public data only (scikit-learn digits), each candidate
with the noise of the private run it stands in for, and no private (MNIST) data is ever packed or read."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpldm.config import load_config
from dpldm.privacy.accountant import noise_multiplier_for
from dpldm.recipes.quickstart import CONFIGS, FAST
from dpldm.recipes.tune_proxy import FAST_CANDIDATES


@pytest.mark.slow
def test_tune_proxy_fast_uses_public_data_and_the_private_runs_noise(tmp_path):
    out = tmp_path / "qs"
    dpldm = Path(sys.executable).parent / "dpldm"
    proc = subprocess.run([str(dpldm), "tune-proxy", "--fast", "--out", str(out), "--repeats", "2"],
                          capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "proxy" / "proxy.json").read_text())
    assert result["scorer_test_accuracy"] > 0.9          # the scorer is a real digit classifier
    assert [r["candidate"] for r in result["rows"]] == list(FAST_CANDIDATES)
    assert result["best"] in FAST_CANDIDATES and "**" + result["best"] in (out / "proxy" / "proxy.md").read_text()

    private = load_config(CONFIGS / "quickstart.yaml")
    sigma = noise_multiplier_for(10.0, FAST.expected_batch / FAST.private_n, FAST.ft_steps, private.privacy.delta,
                                 private.privacy.accountant, private.privacy.relation)
    runs = sorted(p.parent for p in (out / "proxy").glob("*/privacy.json"))
    # two independent fine-tunes per candidate; the guidance variant reused the quickstart.yaml ones
    assert [r.name for r in runs] == ["C0.1-eps10", "C0.1-eps10-r1", "quickstart-eps10", "quickstart-eps10-r1"]
    adapters = [load_file(str(out / "proxy" / f"quickstart-eps10{r}" / "adapter" / "adapter.safetensors"))
                for r in ("", "-r1")]
    assert any(not torch.equal(a, adapters[1][k]) for k, a in adapters[0].items())   # their own noise and batches
    for run in runs:
        ledger = json.loads((run / "privacy.json").read_text())
        cfg = load_config(run / "config.yaml")
        assert ledger["noise_multiplier"] == pytest.approx(sigma, rel=1e-9)    # the private run's sigma
        assert ledger["expected_batch_size"] == FAST.expected_batch and ledger["steps"] == FAST.ft_steps
        assert ledger["dataset_size"] == 1347 and "digits-train" in cfg.data.private
    assert load_config(out / "proxy" / "C0.1-eps10" / "config.yaml").privacy.max_grad_norm == 0.1
    base = out / "proxy" / "quickstart-eps10"
    assert json.loads((base / "samples-g2" / "samples.json").read_text())["guidance"] == 2.0
    assert json.loads((base / "samples" / "samples.json").read_text())["guidance"] == private.sample.guidance
    for r in result["rows"]:
        assert 0.0 <= r["agreement"] <= 1.0 and r["n"] == FAST.synthetic_n
        assert len(r["downstream_runs"]) == 2 and r["downstream"] == pytest.approx(sum(r["downstream_runs"]) / 2)
    # nothing private was packed: only the public pretraining set and the proxy
    assert sorted(p.name for p in (out / "data").iterdir()) == ["digits-test", "digits-train", "glyphs-digits-train"]


def test_plan_candidates_change_the_plan_and_config_candidates_the_config():
    from dataclasses import replace

    from dpldm.errors import DpldmError
    from dpldm.recipes.quickstart import FULL
    from dpldm.recipes.tune_proxy import CANDIDATES, split_overrides
    plan, rest = split_overrides(FULL, {"plan.public": "glyphs", "optim.lr": 0.1})
    assert plan == replace(FULL, public="glyphs") and rest == {"optim.lr": 0.1}
    assert split_overrides(FULL, CANDIDATES["quickstart.yaml"][0]) == (FULL, {})
    assert {split_overrides(FULL, CANDIDATES[c][0])[0].public for c in ("fashion pretraining", "glyph pretraining")} \
        == {"fashion", "glyphs"}
    with pytest.raises(DpldmError, match="plan.unet_stepz"):
        split_overrides(FULL, {"plan.unet_stepz": 10})


def test_another_pretraining_budget_gets_its_own_public_pipeline():
    from dpldm.recipes.quickstart import FULL
    from dpldm.recipes.tune_proxy import CANDIDATES, pretraining_suffix, split_overrides
    longer = split_overrides(FULL, CANDIDATES["U-Net 3,200 steps"][0])[0]
    assert longer.unet_steps == 3200 and pretraining_suffix(longer, FULL) == "-ae300-unet3200-b64-n0"
    # candidates that keep the plan's pretraining share its pipeline folder
    for name in ("quickstart.yaml", "guidance 1.5", "half the DP steps", "8 sampler steps"):
        assert pretraining_suffix(split_overrides(FULL, CANDIDATES[name][0])[0], FULL) == ""


def test_the_downstream_augmentation_candidate_reuses_the_plans_fine_tune():
    from dpldm.recipes.quickstart import FULL
    from dpldm.recipes.tune_proxy import CANDIDATES, eval_only, split_overrides
    plan, rest = split_overrides(FULL, CANDIDATES["no downstream augmentation"][0])
    assert FULL.clf_augment == "affine" and plan.clf_augment == "none" and rest == {}
    assert eval_only("no downstream augmentation") and not eval_only("rank 2")
    plan, rest = split_overrides(FULL, CANDIDATES["no label smoothing"][0])
    assert FULL.clf_label_smoothing == 0.1 and plan.clf_label_smoothing == 0.0 and rest == {}
    assert eval_only("no label smoothing")
