"""`dpldm audit CONFIG [overrides]`: an empirical lower bound on ε from ONE fine-tuning run with
canaries (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run").

1. m canaries (distinctive synthetic block patterns with a class label) are each added to the
   private set independently with probability 1/2;
2. one fine-tune runs through `dpldm.train.finetune.run_finetune` on base data + included canaries;
3. each canary is scored by how much the fine-tune lowered its diffusion loss (fixed timesteps and
   noises, base model vs base + adapter);
4. the auditor guesses "in" for the k+ highest scores and "out" for the k− lowest (abstains on the
   rest); for an (ε, δ)-DP run the number of correct guesses is dominated by
   Binomial(r, e^ε/(1+e^ε)) (plus a δ term), so the largest ε that this count rejects at level β is
   a lower bound on the run's true ε with confidence 1 − β.

The bound is only a lower bound: a value far below the claimed ε does not show the claim is tight
(one run, a weak black-box attacker, few canaries); a value ABOVE the claimed ε shows a bug.

Its size caps what it can show: with m canaries and r guesses, even r correct guesses bound ε by at most
`max_certifiable_epsilon(m, r)` (≈ 2.3 for the default 64 / 32), so it cannot flag an ε = 10 claim.
`audit_power` says so before the fine-tune runs and in audit.md, with the smallest sizes that could.
OUT/private_with_canaries (and OUT/latent_cache) hold a copy of the private data: never publish them.
"""
from __future__ import annotations

import copy
import json
import math
import secrets
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from dpldm.config import load_config
from dpldm.errors import DpldmError
from dpldm.eval.shards import load_shards, write_shards
from dpldm.log import log as _log
from dpldm.models.adapters import load_adapter
from dpldm.models.diffusion_loss import diffusion_loss, example_draws, unet_caller
from dpldm.models.pipeline import class_prompts, encode_images, encode_prompts, load_pipeline
from dpldm.run_dir import RunDir
from dpldm.train.finetune import run_finetune


# -- statistics ---------------------------------------------------------------------------------

def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """P[≥ v correct of r guesses] under the null hypothesis "the run is (ε, δ)-DP", m canaries.

    Pure part: P[Binomial(r, q) ≥ v] with q = e^ε/(1+e^ε). With δ > 0 the paper's Theorem adds
    2·m·δ·α, α = max_{1≤i≤v} P[v−i ≤ Binomial(r, q) < v] / i."""
    if not 0 <= v <= r <= m:
        raise DpldmError(f"audit: need 0 ≤ correct ≤ guesses ≤ canaries; got {v}, {r}, {m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise DpldmError(f"audit: need eps ≥ 0 and 0 ≤ delta ≤ 1; got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta > 0 and v > 0:
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)   # P[B = v−1], P[B = v−2], ...
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
        tail += 2 * m * delta * alpha
    return min(tail, 1.0)


def epsilon_lower_bound(correct: int, guesses: int, beta: float = 0.05, delta: float = 0.0,
                        m: int | None = None, eps_max: float = 100.0) -> float:
    """The largest ε with p_value(ε) < β (bisection; p_value grows with ε): with confidence 1−β the
    run is NOT (ε', δ)-DP for any ε' below it. 0.0 when even ε = 0 cannot be rejected."""
    if not 0 < beta < 1:
        raise DpldmError(f"audit: beta (1 − confidence) must be in (0, 1); got {beta}")
    m = guesses if m is None else m
    if guesses == 0 or p_value(m, guesses, correct, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, eps_max
    if p_value(m, guesses, correct, hi, delta) < beta:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if p_value(m, guesses, correct, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_from_scores(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 ("in") for the k_pos highest scores, −1 ("out") for the k_neg lowest, 0 (abstain) else."""
    if k_pos + k_neg > len(scores):
        raise DpldmError(f"audit: {k_pos}+{k_neg} guesses exceed the {len(scores)} canaries")
    order = np.argsort(-np.asarray(scores), kind="stable")
    g = np.zeros(len(scores), dtype=np.int64)
    g[order[:k_pos]] = 1
    if k_neg:
        g[order[len(scores) - k_neg:]] = -1
    return g


def audit_statistics(scores: np.ndarray, members: np.ndarray, k_pos: int, k_neg: int, beta: float,
                     delta: float) -> dict:
    """Guesses, their accuracy and the ε lower bound (pure-ε and δ-adjusted)."""
    g = guess_from_scores(scores, k_pos, k_neg)
    truth = np.where(members, 1, -1)
    r = int((g != 0).sum())
    v = int(((g == truth) & (g != 0)).sum())
    m = len(scores)
    return {"canaries": m, "guesses": r, "correct": v, "accuracy": v / r if r else 0.0, "beta": beta,
            "confidence": 1 - beta, "epsilon_lower_bound_pure": epsilon_lower_bound(v, r, beta, 0.0, m),
            "epsilon_lower_bound": epsilon_lower_bound(v, r, beta, delta, m), "delta": delta}


def max_certifiable_epsilon(canaries: int, guesses: int, beta: float = 0.05, delta: float = 0.0) -> float:
    """The largest ε bound an audit of this size can ever give: every one of its guesses correct."""
    return epsilon_lower_bound(guesses, guesses, beta, delta, canaries)


def sizes_to_flag(claimed: float, beta: float = 0.05, delta: float = 0.0, guess_fraction: float = 0.5,
                  max_canaries: int = 2 ** 20) -> tuple[int, int] | None:
    """The smallest (canaries, guesses = guess_fraction · canaries) on a grid of 4 sizes per doubling from 64
    whose perfect guessing would bound ε above `claimed` (necessary, not sufficient: real guesses err);
    None when no size up to max_canaries can (with δ > 0 the δ term grows with m: δ·e^ε must be small)."""
    k = 0
    while (m := int(round(64 * 2 ** (k / 4)))) <= max_canaries:
        r = max(1, int(m * guess_fraction))
        if p_value(m, r, r, claimed, delta) < beta:
            return m, r
        k += 1
    return None


def audit_power(canaries: int, guesses: int, claimed: float, beta: float = 0.05, delta: float = 0.0) -> dict:
    """What an audit of this size can show about a `claimed` ε, and the sizes that could flag it."""
    cap = max_certifiable_epsilon(canaries, guesses, beta, delta)
    power = {"max_certifiable_epsilon": cap, "canaries": canaries, "guesses": guesses, "claimed": claimed,
             "can_flag_claim": bool(math.isfinite(claimed) and cap > claimed)}
    if math.isfinite(claimed) and not power["can_flag_claim"]:
        frac = guesses / canaries
        power["needed"] = sizes_to_flag(claimed, beta, delta, frac)
        power["needed_pure"] = sizes_to_flag(claimed, beta, 0.0, frac)
    return power


def power_message(p: dict, beta: float = 0.05, delta: float = 0.0) -> str:
    """One line: the cap of this audit and, when it cannot flag the claim, the sizes that could."""
    head = (f"audit: {p['canaries']} canaries / {p['guesses']} guesses can certify at most ε ≈ "
            f"{p['max_certifiable_epsilon']:.2f} (every guess right, {100 * (1 - beta):.0f}% confidence, "
            f"δ = {delta:g})")
    if not math.isfinite(p["claimed"]) or p["can_flag_claim"]:
        return head + (f"; enough to flag the claimed ε = {p['claimed']:.3g}" if math.isfinite(p["claimed"]) else "")
    need = (f"flagging it needs ≥ {p['needed'][0]:,} canaries and {p['needed'][1]:,} guesses, all correct"
            if p.get("needed") else f"no audit of up to {2 ** 20:,} canaries can at this δ (δ·e^ε is too large)")
    pure = (f"; the pure-ε bound needs ≥ {p['needed_pure'][0]:,} canaries and {p['needed_pure'][1]:,} guesses"
            if p.get("needed_pure") and p.get("needed_pure") != p.get("needed") else "")
    return f"{head}: it CANNOT flag the claimed ε = {p['claimed']:.3g}; {need}{pure}"


# -- canaries and scoring -----------------------------------------------------------------------

def make_canaries(m: int, channels: int, resolution: int, first_label: int, seed: int = 0):
    """m distinctive images: random high-contrast 8×8 block patterns (uint8 [m,C,H,W]), far from
    natural data and from each other, each with its OWN class label first_label + i (prompt
    "canary i"), so a member's prompt→image pair can only be learnt from that canary itself."""
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(m, channels, 8, 8, generator=g) > 0.5).float()
    img = torch.nn.functional.interpolate(blocks, size=(resolution, resolution), mode="nearest")
    return (img * 255).to(torch.uint8), torch.arange(first_label, first_label + m)


@torch.no_grad()
def diffusion_losses(comps, unet, images: torch.Tensor, labels: torch.Tensor, prompts: list[str],
                     k: int, seed: int) -> np.ndarray:
    """Per-canary diffusion loss at K fixed (timestep, noise) draws keyed by (seed, canary index),
    timesteps from the high-noise second half of the schedule."""
    device = next(unet.parameters()).device
    z, _ = encode_images(comps.vae, images.float().div(127.5).sub(1).to(device))
    table = encode_prompts(comps, prompts).to(device)
    # high-noise timesteps (second half): a model that memorised an image predicts its noise there,
    # while generic denoising (which also helps non-members) does not
    half = comps.scheduler.config.num_train_timesteps // 2
    t, noise, _ = example_draws(seed, 0, range(len(z)), k, tuple(z.shape[1:]), half)
    t = t + half
    pred_type = comps.scheduler.config.prediction_type
    out = []
    for i in range(0, len(z), 16):
        sl = slice(i, i + 16)
        out.append(diffusion_loss(unet_caller(unet), comps.scheduler.alphas_cumprod, z[sl],
                                  table[labels[sl].to(device)], t[sl].to(device), noise[sl].to(device),
                                  pred_type).cpu())
    return torch.cat(out).double().numpy()


def canary_scores(pretrained: str, run_dir: Path, images, labels, prompts, k: int = 16, seed: int = 1234) -> np.ndarray:
    """Loss decrease (before − after fine-tuning) of each canary; members should decrease more."""
    comps = load_pipeline(pretrained)
    before = diffusion_losses(comps, comps.unet, images, labels, prompts, k, seed)
    load_adapter(comps.unet, RunDir(run_dir).adapter)
    after = diffusion_losses(comps, comps.unet, images, labels, prompts, k, seed)
    return before - after


# -- orchestration ------------------------------------------------------------------------------

def run_audit(cfg, canaries: int = 64, guesses: int = 0, beta: float = 0.05, out_dir: str = "",
              seed: int | None = 0, log=_log) -> dict:
    """Insert canaries, fine-tune once, score, bound ε; writes OUT/audit.json and OUT/audit.md."""
    if canaries < 2:
        raise DpldmError(f"audit: --canaries must be ≥ 2; got {canaries}")
    guesses = guesses or canaries // 2
    if not 0 < guesses <= canaries:
        raise DpldmError(f"audit: --guesses must be in 1..{canaries}; got {guesses}")
    out = Path(out_dir or cfg.output.dir)
    if seed is None:                # the canaries and their membership need not be secret, only random
        seed = secrets.randbits(31)
    delta = float(cfg.privacy.delta or 0.0)
    claim = float(cfg.privacy.target_epsilon) if cfg.privacy.enabled else math.inf
    log(power_message(audit_power(canaries, guesses, claim, beta, delta), beta, delta))
    res, ch = cfg.model.resolution, cfg.model.channels
    if cfg.data.private:
        base_x, base_y = load_shards(cfg.data.private, channels=ch, resolution=res, limit=cfg.data.limit)
    else:
        base_x, base_y = torch.zeros(0, ch, res, res), torch.zeros(0, dtype=torch.long)
    names = list(cfg.model.class_names) or [str(i) for i in range(int(base_y.max()) + 1 if len(base_y) else 0)]
    cx, cy = make_canaries(canaries, ch, res, len(names), seed)
    names = names + [f"canary {i}" for i in range(canaries)]
    members = (torch.rand(canaries, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).numpy()
    log(f"audit: {canaries} canaries, {int(members.sum())} inserted into {len(base_x)} private examples")
    priv_x = torch.cat([(base_x * 255).round().to(torch.uint8), cx[torch.from_numpy(members)]])
    priv_y = torch.cat([base_y, cy[torch.from_numpy(members)]])
    write_shards(priv_x, priv_y, out / "private_with_canaries")
    log(f"audit: {out / 'private_with_canaries'} and {out / 'latent_cache'} hold a copy of the private data: "
        "never publish them; delete them after the audit")

    ft_cfg = copy.deepcopy(cfg)
    ft_cfg.data.private = str(out / "private_with_canaries")
    ft_cfg.data.cache_dir = str(out / "latent_cache")
    ft_cfg.data.limit = 0
    ft_cfg.model.class_names = names
    ft_cfg.output.dir = str(out / "finetune")
    run_dir = run_finetune(ft_cfg)
    ledger = json.loads(RunDir(run_dir).ledger.read_text())

    prompts = class_prompts(names, cfg.model.prompt_template)
    scores = canary_scores(cfg.model.pretrained, run_dir, cx, cy, prompts)
    result = audit_statistics(scores, members, guesses - guesses // 2, guesses // 2, beta,
                              float(ledger.get("delta") or 0.0))
    result.update(claimed_epsilon=ledger.get("epsilon") if ledger.get("private") else math.inf,
                  claimed_delta=ledger.get("delta"), accountant=ledger.get("accountant"),
                  private=bool(ledger.get("private")), run=str(run_dir), scores=scores.tolist(),
                  members=members.astype(int).tolist(), score="diffusion-loss decrease at 16 fixed high-noise draws",
                  bound_kind="Steinke-Nasr-Jagielski 2023, δ-adjusted (pure-ε value also given)")
    result["exceeds_claim"] = bool(result["private"] and result["epsilon_lower_bound"] > result["claimed_epsilon"])
    result["power"] = audit_power(canaries, guesses, result["claimed_epsilon"], beta, result["delta"])
    result["power_message"] = power_message(result["power"], beta, result["delta"])
    result["canary_seed"] = seed
    out.mkdir(parents=True, exist_ok=True)
    claimed = result["claimed_epsilon"]
    def finite(x):
        return x if math.isfinite(x) else "inf"
    (out / "audit.json").write_text(json.dumps(  # standard JSON: no Infinity
        {**result, "claimed_epsilon": finite(claimed), "power": {**result["power"], "claimed": finite(claimed)}},
        indent=2, default=str))
    (out / "audit.md").write_text(_markdown(result))
    log(f"audit: {result['correct']}/{result['guesses']} correct guesses → ε ≥ {result['epsilon_lower_bound']:.3f} "
        f"at {100 * (1 - beta):.0f}% confidence (claimed ε = {result['claimed_epsilon']})")
    log(result["power_message"])
    return result


def _markdown(r: dict) -> str:
    claim = "∞ (NOT PRIVATE)" if not math.isfinite(r["claimed_epsilon"]) else f"{r['claimed_epsilon']:.4g}"
    verdict = ("**The empirical bound EXCEEDS the claimed ε: the privacy accounting or implementation is wrong.**"
               if r["exceeds_claim"] else "The empirical bound is consistent with the claimed ε.")
    return "\n".join([
        "# Privacy audit (one run, canaries)", "",
        f"- canaries: {r['canaries']} (each inserted with probability 1/2), guesses: {r['guesses']}, "
        f"correct: {r['correct']} ({100 * r['accuracy']:.1f}%)",
        f"- empirical lower bound: **ε ≥ {r['epsilon_lower_bound']:.3f}** at confidence {100 * r['confidence']:.0f}% "
        f"(δ = {r['delta']:g}; pure-ε version: {r['epsilon_lower_bound_pure']:.3f})",
        f"- claimed: ε = {claim}, δ = {r['claimed_delta']}, accountant = {r['accountant']}",
        f"- score: {r['score']}; run: `{r['run']}`", "", verdict, "",
        "## What this can and cannot show", "",
        "- It is a statistical LOWER bound from one run: with the stated confidence the run is not "
        "(ε', δ)-DP for any ε' below it. A bound above the claimed ε proves a bug.",
        "- A bound far below the claimed ε does NOT prove the claim is tight or that the run is safe to a "
        "stronger attacker: one run, a black-box loss-based score and m canaries cap what it can detect "
        f"(with {r['canaries']} canaries even perfect guesses give only a few units of ε).",
        "- Canaries are synthetic patterns, i.e. worst-case-ish outliers; typical private examples leak less.",
        f"- Size: {r['power_message'].removeprefix('audit: ')}.",
        "- `private_with_canaries/` and `latent_cache/` in this directory hold a copy of the private data: never "
        "publish them.", ""])


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if not cfg.model.pretrained:
        raise DpldmError("model.pretrained: the audit fine-tunes a pipeline; set it to a pipeline folder")
    run_audit(cfg, canaries=getattr(args, "canaries", 64), guesses=getattr(args, "guesses", 0),
              beta=getattr(args, "beta", 0.05), out_dir=getattr(args, "out", ""), seed=cfg.seed)
    return 0
