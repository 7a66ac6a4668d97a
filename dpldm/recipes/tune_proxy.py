"""`dpldm tune-proxy [--out DIR] [--fast]`: choose the quickstart's DP fine-tune settings on public data only.

The quickstart's private set is MNIST; choosing its learning rate, clipping or prompts by scoring MNIST
fine-tunes is a leak that (ε, δ) does not cover. Here the same public pretrained pipeline (font-rendered
glyphs by default; shared with `dpldm quickstart --out DIR`, so it is pretrained once) is DP-fine-tuned on a
public stand-in:
scikit-learn's 8x8 digits (source `digits`, a different collection than MNIST; 1,347 train, 450 test).

Each proxy run gets the noise the private run will get: the σ calibrated for MNIST's N = 60,000, the same
expected batch, steps, ε and δ, and the same C, so every step's noise-to-signal ratio matches; only the data
differ. (The proxy's own ε is meaningless, its data are public; it is never reported.) Candidates differ
from configs/quickstart.yaml in one setting each. The selection metric is the quickstart's own: a CNN trained
on a candidate's samples, tested on the real digits test split (mean of 3 seeds). Class agreement (the share
of samples a CNN trained on real digits labels as the class they were drawn for) is shown beside it but not
used: it rewards high guidance, whose less varied samples teach a classifier less (docs/results.md).
Writes DIR/proxy/proxy.md and proxy.json and names the best candidate.
"""
from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from dpldm.config import apply_mapping
from dpldm.errors import DpldmError
from dpldm.eval.classifier import accuracy, evaluate_synthetic, train_classifier
from dpldm.eval.shards import load_shards
from dpldm.privacy.accountant import noise_multiplier_for
from dpldm.recipes.quickstart import (FAST, FULL, Plan, Stage, finetune_cfg, finetuned, pack_sets, pretrain_public,
                                      public_set, sampled)

MNIST_TRAIN_N = 60000      # the private set's size in the full quickstart (public knowledge, recorded in its ledger)
PROXY_SAMPLES = 500        # samples scored per candidate per 2,000 of the plan's synthetic_n (full plan)
SCORER_EPOCHS = 15         # the scorer trains on 1,347 real digits: seconds
PROXY_SEEDS = 3            # downstream CNNs per candidate (seconds each on 500 samples)

# name -> (config overrides, sampling guidance or None for the config's): one change from quickstart.yaml each.
# Overrides named "plan.X" change the quickstart Plan instead (e.g. the public pretraining set).
CANDIDATES: dict[str, tuple[dict, float | None]] = {
    "quickstart.yaml": ({}, None),
    "fashion pretraining": ({"plan.public": "fashion"}, None),
    "glyph pretraining": ({"plan.public": "glyphs"}, None),
    # the same DP compute (steps x expected batch), split differently; sigma recalibrated for the new q and steps
    "batch 1024 x 80 steps": ({"plan.expected_batch": 1024, "plan.ft_steps": 80}, None),
    "half the DP steps": ({"plan.ft_steps": 80}, None),   # the earlier plan (80 x 512)
    # the same U-Net rows per step (256 x 2): each example's gradient averages K = 2 noise draws before its clip
    "K = 2, batch 256": ({"plan.multiplicity": 2, "plan.expected_batch": 256}, None),
    # another public pretraining budget of the U-Net (own folder; the plan's pipeline is left as it is)
    "U-Net 800 steps": ({"plan.unet_steps": 800}, None),   # the plans of round 3 and round 4
    "U-Net 1,600 steps": ({"plan.unet_steps": 1600}, None),
    "U-Net 3,200 steps": ({"plan.unet_steps": 3200}, None),
    "240 DP steps": ({"plan.ft_steps": 240}, None),      # more DP steps of the same expected batch (sigma recalibrated)
    "800 DP steps": ({"plan.ft_steps": 800}, None),      # the long plan's DP steps (it collapsed at eps = 1 on MNIST)
    # sampling / downstream protocol only: these reuse the quickstart.yaml candidate's fine-tune
    "downstream 4x steps": ({"plan.clf_epochs": 20}, None),
    "no downstream augmentation": ({"plan.clf_augment": "none"}, None),   # the protocol before round 12
    "no label smoothing": ({"plan.clf_label_smoothing": 0.0}, None),       # the protocol before round 13
    "2,000 samples at 8 sampler steps": ({"plan.synthetic_n": 2000, "plan.sample_steps": 8}, None),
    "8 sampler steps": ({"plan.sample_steps": 8}, None),
    "guidance 1": ({}, 1.0),
    "guidance 1.5": ({}, 1.5),
    "guidance 2": ({}, 2.0),
    "guidance 3": ({}, 3.0),
    "guidance 4": ({}, 4.0),
    "guidance 8": ({}, 8.0),
    "C = 0.1": ({"privacy.max_grad_norm": 0.1}, None),
    "C = 0.001": ({"privacy.max_grad_norm": 0.001}, None),
    "no clip groups": ({"privacy.clip_groups": []}, None),
    "lr 1e-2": ({"optim.lr": 1e-2}, None),
    "lr 1e-1": ({"optim.lr": 1e-1}, None),
    "lr warm-up 10 steps": ({"optim.warmup_steps": 10}, None),
    "flat lr": ({"optim.decay": "none"}, None),   # quickstart.yaml decays the lr (cosine): the last steps' noise
    "lr cosine decay": ({"optim.decay": "cosine"}, None),  # moves the adapter less (round 7; = quickstart.yaml now)
    "adapter EMA 0.9": ({"train.ema_decay": 0.9}, None),   # iterate averaging (post-processing: no privacy cost)
    "all levels": ({"adapter.levels": ["down", "mid", "up"]}, None),
    # the adapter's dimension d: the noise's norm grows with sqrt(d) at a fixed clipped signal (matters most at eps 1)
    "rank 1": ({"adapter.rank": 1}, None),
    "rank 2": ({"adapter.rank": 2}, None),
    "rank 4": ({"adapter.rank": 4}, None),
    "rank 8": ({"adapter.rank": 8}, None),
    "up level only": ({"adapter.levels": ["up"]}, None),
    "digit prompts": ({"model.class_names": [str(i) for i in range(10)],
                       "model.prompt_template": "a handwritten digit {name}"}, None),
}
FAST_CANDIDATES = ("quickstart.yaml", "guidance 2", "C = 0.1")
# Plan fields that change only sampling or the downstream classifier (not the fine-tune)
EVAL_ONLY = {"clf_epochs", "clf_augment", "clf_label_smoothing", "synthetic_n", "sample_steps"}


def proxy_sigma(plan: Plan, eps: float, delta: float, accountant: str, relation: str = "add_remove") -> float:
    """σ of the private run this proxy stands in for (its N, expected batch, steps, accountant and relation)."""
    n = plan.private_n or MNIST_TRAIN_N
    return noise_multiplier_for(eps, plan.expected_batch / n, plan.ft_steps, delta, accountant, relation)


def proxy_cfg(out: Path, pipeline: Path, data: dict, plan: Plan, eps: float, name: str, overrides: dict,
              repeat: int = 0):
    """The candidate's proxy fine-tune config and σ; `repeat` k > 0: the same fine-tune again in its own run dir
    (its own secret seed, so its own noise draws and Poisson batches)."""
    cfg = finetune_cfg(out, pipeline, {"private": data["digits"], "test": data["digits-test"]}, plan, eps)
    sigma = proxy_sigma(plan, eps, cfg.privacy.delta, cfg.privacy.accountant, cfg.privacy.relation)
    slug = name.replace(" ", "").replace("=", "").replace(".yaml", "")
    return apply_mapping(cfg, {
        **overrides, "privacy.noise_multiplier": sigma,
        # public data: the proxy's own (large) ε guarantees nothing; RDP accounts it without failing
        "privacy.accountant": "rdp", "privacy.relation": "add_remove", "privacy.target_epsilon": 1e6,
        "data.cache_dir": str(out / "proxy" / f"latent_cache-{plan.public}"),   # one per autoencoder
        "output.dir": str(out / "proxy" / f"{slug}-eps{eps:g}{f'-r{repeat}' if repeat else ''}")}), sigma


def split_overrides(plan: Plan, overrides: dict) -> tuple[Plan, dict]:
    """(the plan with its "plan.X" overrides applied, the remaining config overrides)."""
    names = {f.name for f in fields(Plan)}
    bad = [k for k in overrides if k.startswith("plan.") and k[5:] not in names]
    if bad:
        raise DpldmError(f"tune-proxy candidate: unknown plan field {bad[0]!r}; expected plan.<one of {sorted(names)}>")
    return (replace(plan, **{k[5:]: v for k, v in overrides.items() if k.startswith("plan.")}),
            {k: v for k, v in overrides.items() if not k.startswith("plan.")})


def pretraining_suffix(candidate: Plan, plan: Plan) -> str:
    """'' for the plan's own pretraining budget, else a folder suffix naming the candidate's: another budget gets
    its own public pipeline and never continues (so changes) the plan's."""
    budget = lambda p: (p.public_n, p.ae_steps, p.unet_steps, p.pretrain_batch)  # noqa: E731
    if budget(candidate) == budget(plan):
        return ""
    c = candidate
    return f"-ae{c.ae_steps}-unet{c.unet_steps}-b{c.pretrain_batch}-n{c.public_n}"


def proxy_epochs(plan: Plan, n: int) -> int:
    """Downstream epochs on n proxy samples that give the quickstart's number of optimizer steps (its clf_epochs
    over its synthetic_n): a classifier of 4x fewer samples trains 4x the epochs, not 4x fewer steps."""
    return max(1, round(plan.clf_epochs * plan.synthetic_n / max(n, 1)))


def eval_only(name: str) -> bool:
    """Whether a candidate changes only sampling/downstream settings (it reuses the quickstart.yaml fine-tune)."""
    overrides, guidance = CANDIDATES[name]
    return bool(overrides or guidance is not None) and all(
        k.startswith("plan.") and k[5:] in EVAL_ONLY for k in overrides)


def run_candidate(cfg, guidance: float | None, n: int, steps: int | None = None, tag: str = "") -> Path:
    """Fine-tune (resumable, shared by candidates that differ only in sampling) and sample n images
    (`steps`: the plan's sampler steps when it differs from the config's; `tag`: the samples folder's suffix)."""
    run = finetuned(cfg)
    settings = {**({"guidance": guidance} if guidance is not None else {}), **({"steps": steps} if steps else {})}
    if not settings and not tag:
        return sampled(run, n)
    tag = tag or f"g{guidance:g}"
    return sampled(run, n, run / f"samples-{tag}", **settings)


def write_table(path: Path, rows: list[dict], scorer_acc: float, best: str) -> None:
    lines = ["# Tuning on a public proxy (`dpldm tune-proxy`)", "",
             "Proxy: scikit-learn digits (public, not MNIST), DP-fine-tuned from the quickstart plan's public "
             "pipeline (each candidate's own when it changes the pretraining) with the σ, C and expected batch of "
             "the private MNIST run. Agreement: share of samples a CNN trained on real "
             f"digits (test accuracy {100 * scorer_acc:.1f}%) labels as their class. Downstream: CNN trained on the "
             "samples, tested on the real digits test split (the selection metric).", "",
             "| candidate | ε of the private run | σ | agreement | downstream | minutes |", "|---|---|---|---|---|---|"]
    for r in rows:
        runs = r["downstream_runs"]
        spread = (f" ± {100 * r['downstream_std']:.1f} ({', '.join(f'{100 * x:.1f}' for x in runs)})"
                  if len(runs) > 1 else "")
        lines.append(f"| {r['candidate']} | {r['epsilon']:g} | {r['sigma']:.3f} | {100 * r['agreement']:.1f}% | "
                     f"{100 * r['downstream']:.1f}%{spread} | {r['seconds'] / 60:.1f} |")
    repeats = len(rows[0]["downstream_runs"]) if rows else 1
    how = ", mean of the repeats" if repeats > 1 else ""
    lines += ["", f"Chosen (highest downstream accuracy at the first ε{how}): **{best}**."]
    if repeats > 1:
        lines.append(f"Each candidate was fine-tuned {repeats} times with independent noise (agreement and downstream: "
                     "means; ± the standard deviation over the repeats, then each repeat's downstream accuracy).")
    path.write_text("\n".join(lines) + "\n")


def main(args) -> int:

    plan = FAST if args.fast else FULL
    out = Path(args.out)
    names = args.candidates or (FAST_CANDIDATES if args.fast else tuple(CANDIDATES))
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise DpldmError(f"--candidates: unknown {unknown}; expected some of {list(CANDIDATES)}")
    if args.repeats < 1:
        raise DpldmError(f"--repeats: expected a number of fine-tunes per candidate >= 1; got {args.repeats}")
    # samples per candidate: the fast plan's own n; else PROXY_SAMPLES per 2,000 of the plan's synthetic_n
    proxy_n = lambda p: p.synthetic_n if args.fast else round(PROXY_SAMPLES * p.synthetic_n / 2000)  # noqa: E731
    timings: dict[str, float] = {}
    plans = {c: split_overrides(plan, CANDIDATES[c][0])[0] for c in names}
    sets = list(dict.fromkeys(public_set(p)[0] for p in plans.values()))
    with Stage(f"pack public sets ({', '.join(sets)}, scikit-learn digits)", timings):
        data = pack_sets(out, plan, (*sets, "digits", "digits-test"))
    pipelines = {}           # one per public set and pretraining budget
    key = lambda p: (p.public, p.public_n, p.ae_steps, p.unet_steps, p.pretrain_batch)  # noqa: E731
    for p in plans.values():
        if key(p) not in pipelines:
            suffix = pretraining_suffix(p, plan)
            with Stage(f"pretrain (or reuse) the public pipeline on {p.public}{suffix}", timings):
                pipelines[key(p)] = pretrain_public(out, data, p, suffix)
    with Stage("scorer: CNN on real digits train", timings):
        x_tr, y_tr = load_shards(str(data["digits"]), channels=1, resolution=28)
        x_te, y_te = load_shards(str(data["digits-test"]), channels=1, resolution=28)
        torch.manual_seed(0)
        scorer = train_classifier(x_tr, y_tr, arch="cnn", epochs=SCORER_EPOCHS)
        scorer_acc = accuracy(scorer, x_te, y_te)
        print(f"scorer: {100 * scorer_acc:.1f}% on the real digits test split")
    rows = []
    for eps in args.epsilons:
        for name in names:
            cand_plan, overrides = split_overrides(plan, CANDIDATES[name][0])
            guidance = CANDIDATES[name][1]
            reuse = eval_only(name)
            n = proxy_n(cand_plan)
            resample = (cand_plan.synthetic_n, cand_plan.sample_steps) != (plan.synthetic_n, plan.sample_steps)
            tag = name.replace(" ", "").replace(",", "-").replace(".", "") if resample and guidance is None else ""
            steps = cand_plan.sample_steps if cand_plan.sample_steps != plan.sample_steps else None
            t0, agreement, downstream = time.time(), [], []
            for k in range(args.repeats):   # independent fine-tunes: the proxy's spread between runs is ~1-2 points
                cfg, sigma = proxy_cfg(out, pipelines[key(cand_plan)], data, plan if reuse else cand_plan, eps,
                                       "quickstart.yaml" if reuse else name, overrides, repeat=k)
                with Stage(f"proxy candidate '{name}'{f' repeat {k + 1}/{args.repeats}' if args.repeats > 1 else ''} "
                           f"(sigma {sigma:.3f} of the eps={eps:g} private run)", timings):
                    shards = run_candidate(cfg, guidance, n, steps, tag)
                xs, ys = load_shards(str(shards), channels=1, resolution=28)
                down = evaluate_synthetic(xs, ys, x_te, y_te, arch="cnn", epochs=proxy_epochs(cand_plan, len(xs)),
                                          seeds=PROXY_SEEDS, augment=cand_plan.clf_augment,
                                          label_smoothing=cand_plan.clf_label_smoothing)
                agreement.append(accuracy(scorer, xs, ys))
                downstream.append(down["mean"])
            spread = torch.tensor(downstream, dtype=torch.float64)
            rows.append({"candidate": name, "epsilon": eps, "sigma": sigma,
                         "agreement": sum(agreement) / len(agreement), "downstream": float(spread.mean()),
                         "downstream_runs": downstream,
                         "downstream_std": float(spread.std()) if len(downstream) > 1 else 0.0,
                         "n": len(xs), "seconds": round(time.time() - t0, 1),
                         "overrides": CANDIDATES[name][0], "guidance": guidance})
            print(f"proxy: {name:<16} eps={eps:g} agreement {100 * rows[-1]['agreement']:.1f}% "
                  f"downstream {100 * rows[-1]['downstream']:.1f}%", flush=True)
    first = [r for r in rows if r["epsilon"] == args.epsilons[0]]
    best = max(first, key=lambda r: r["downstream"])["candidate"]     # ties: the earlier (quickstart.yaml first)
    (out / "proxy" / "proxy.json").write_text(json.dumps({"scorer_test_accuracy": scorer_acc, "best": best,
                                                          "rows": rows, "timings_s": timings}, indent=2))
    write_table(out / "proxy" / "proxy.md", rows, scorer_acc, best)
    print(f"\ntune-proxy: best '{best}'; table at {out / 'proxy' / 'proxy.md'}")
    return 0
