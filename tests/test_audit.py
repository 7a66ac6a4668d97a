"""The one-run audit's statistics (Steinke, Nasr & Jagielski 2023) and, end to end on a tiny pipeline,
that it detects a leaky non-private fine-tune and stays below the claimed ε of a DP run."""
import math

import numpy as np
import pytest
from scipy import stats

from dpldm.errors import DpldmError
from dpldm.privacy.audit import (audit_statistics, epsilon_lower_bound, guess_from_scores, make_canaries,
                                 p_value)


def test_pure_p_value_is_the_binomial_tail():
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(100, 50, 40, 1.0) == pytest.approx(stats.binom.sf(39, 50, q))
    assert p_value(100, 50, 40, 1.0, delta=1e-5) > p_value(100, 50, 40, 1.0)   # δ only loosens


def test_bound_rejects_exactly_below_it():
    eps = epsilon_lower_bound(45, 50, beta=0.05)
    assert eps > 0
    assert p_value(50, 50, 45, eps * 0.999) < 0.05 <= p_value(50, 50, 45, eps * 1.01)


def test_bound_is_monotone_in_correct_guesses_and_confidence():
    bounds = [epsilon_lower_bound(v, 100, 0.05) for v in range(50, 101, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[0]
    assert epsilon_lower_bound(90, 100, 0.01) < epsilon_lower_bound(90, 100, 0.1)
    assert epsilon_lower_bound(90, 100, 0.05, delta=1e-3, m=200) <= epsilon_lower_bound(90, 100, 0.05)


def test_perfect_guessing_of_many_canaries_gives_a_large_bound():
    # all r guesses right: rejected iff q^r < β, q = e^ε/(1+e^ε); r = 1000 → ε ≈ 5.8
    assert epsilon_lower_bound(1000, 1000, 0.05) > 5.0
    assert epsilon_lower_bound(1000, 1000, 0.05) > epsilon_lower_bound(100, 100, 0.05) > 2.0


def test_random_guessing_gives_about_zero():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        members = rng.random(1000) < 0.5
        bounds.append(audit_statistics(rng.random(1000), members, 250, 250, 0.05, 0.0)["epsilon_lower_bound"])
    assert np.mean(bounds) < 0.05 and max(bounds) < 0.25


def test_guesses_take_top_and_bottom_scores():
    g = guess_from_scores(np.array([0.1, 5.0, -3.0, 0.2, 4.0]), 2, 1)
    assert g.tolist() == [0, 1, -1, 0, 1]
    with pytest.raises(DpldmError, match="exceed"):
        guess_from_scores(np.zeros(3), 2, 2)
    with pytest.raises(DpldmError, match="beta"):
        epsilon_lower_bound(3, 4, beta=1.5)


def test_canaries_are_distinct_patterns():
    x, y = make_canaries(32, 1, 16, 10, seed=0)
    assert x.shape == (32, 1, 16, 16) and set(x.unique().tolist()) <= {0, 255}
    assert len({bytes(i.numpy()) for i in x}) == 32 and y.tolist() == list(range(10, 42))   # own classes


def test_default_audit_size_caps_the_certifiable_epsilon_and_says_which_sizes_could_flag_a_claim():
    """Issue 11 §9: 64 canaries / 32 guesses can never certify more than ε ≈ 2.3, so an ε = 10 claim cannot be
    flagged; the audit says so and names the sizes that could (all-correct guessing: necessary, not sufficient)."""
    from dpldm.privacy.audit import audit_power, max_certifiable_epsilon, power_message, sizes_to_flag
    cap = max_certifiable_epsilon(64, 32, 0.05, 1e-5)
    assert cap == pytest.approx(2.32, abs=0.01)
    assert epsilon_lower_bound(32, 32, 0.05, 1e-5, 64) == cap           # what perfect guessing would give
    p10 = audit_power(64, 32, 10.0, 0.05, 1e-5)
    assert p10["can_flag_claim"] is False and p10["needed"] is None      # δ·e^ε = 0.22 > β: no size can
    m, r = p10["needed_pure"]
    assert r == m // 2 and epsilon_lower_bound(r, r, 0.05, 0.0, m) > 10.0
    assert 0.05 ** (1 / r) > 1 / (1 + math.exp(-10.0))  # minimal up to the grid: a quarter-doubling smaller fails
    assert not epsilon_lower_bound(int(r / 2 ** 0.25), int(r / 2 ** 0.25), 0.05) > 10.0
    msg = power_message(p10, 0.05, 1e-5)
    assert "64 canaries / 32 guesses can certify at most ε ≈ 2.32" in msg
    assert "CANNOT flag the claimed ε = 10" in msg
    assert f"{m:,} canaries and {r:,} guesses" in msg and "\n" not in msg
    p4 = audit_power(64, 32, 4.0, 0.05, 1e-5)
    assert p4["needed"] == sizes_to_flag(4.0, 0.05, 1e-5) and max_certifiable_epsilon(*p4["needed"], 0.05, 1e-5) > 4
    assert audit_power(64, 32, 1.0, 0.05, 1e-5)["can_flag_claim"] and "enough to flag" in power_message(
        audit_power(64, 32, 1.0, 0.05, 1e-5), 0.05, 1e-5)
    assert "CANNOT" not in power_message(audit_power(64, 32, math.inf), 0.05)    # a NOT PRIVATE run


# -- end to end: one real fine-tune each on a tiny pipeline (8×8 latents) ---------------------------

@pytest.fixture(scope="module")
def scaled_pipeline(tmp_path_factory):
    """tests/tiny.py's random-weight pipeline, but with the VAE's scaling_factor measured on canary-like
    images (as `dpldm pretrain autoencoder` does): with the raw random VAE, latents have std ~0.05 and
    vanish under the diffusion noise, so no image could be memorised at all."""
    import torch

    from dpldm.models.pipeline import encode_images, load_pipeline, save_pipeline
    from tiny import make_tiny_pipeline
    torch.set_num_threads(1)
    folder = make_tiny_pipeline(tmp_path_factory.mktemp("audit") / "pipe")
    comps = load_pipeline(folder)
    x, _ = make_canaries(64, 1, 16, 0, seed=99)
    z, _ = encode_images(comps.vae, x.float() / 127.5 - 1)
    comps.vae.register_to_config(scaling_factor=float(1 / z.std()))
    save_pipeline(comps, folder)
    return folder


def _audit_cfg(tmp_path, pipe, **over):
    from tiny import finetune_config
    base = {"data.private": "", "privacy.expected_batch_size": 8, "adapter.kind": "full", "optim.lr": 1e-3,
            "train.log_every": 100, "privacy.noise_multiplicity": 2}
    base.update(over)
    return finetune_config(tmp_path, pipe, tmp_path, out="unused", **base)


def test_audit_detects_a_leaky_non_private_run(tmp_path, scaled_pipeline):
    from dpldm.privacy.audit import run_audit
    cfg = _audit_cfg(tmp_path, scaled_pipeline, **{"privacy.enabled": False, "train.steps": 150})
    res = run_audit(cfg, canaries=32, guesses=16, out_dir=str(tmp_path / "leaky"), log=lambda m: None)
    assert res["private"] is False and math.isinf(res["claimed_epsilon"])
    assert res["epsilon_lower_bound"] > 0.5, res
    print("leaky audit:", res["correct"], "/", res["guesses"], "eps >=", res["epsilon_lower_bound"])
    md = (tmp_path / "leaky" / "audit.md").read_text()
    assert "NOT PRIVATE" in md and "cannot show" in md
    assert "32 canaries / 16 guesses can certify at most" in md and "never publish" in md


def test_audit_of_a_dp_run_stays_below_the_claimed_epsilon(tmp_path, scaled_pipeline):
    import json
    from dpldm.privacy.audit import run_audit
    cfg = _audit_cfg(tmp_path, scaled_pipeline, **{"privacy.target_epsilon": 4.0, "train.steps": 10})
    res = run_audit(cfg, canaries=32, guesses=16, out_dir=str(tmp_path / "dp"), log=lambda m: None)
    assert res["private"] is True and 0 < res["claimed_epsilon"] <= 4.0 * 1.001
    assert res["epsilon_lower_bound"] < res["claimed_epsilon"] and not res["exceeds_claim"]
    print("dp audit:", res["correct"], "/", res["guesses"], "eps >=", res["epsilon_lower_bound"],
          "claimed", res["claimed_epsilon"])
    saved = json.loads((tmp_path / "dp" / "audit.json").read_text())
    assert saved["guesses"] == 16 and len(saved["scores"]) == 32 and sum(saved["members"]) > 0
