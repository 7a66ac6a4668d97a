"""DP overhead: step time and peak memory of the DP step over the non-private step, per adapter kind.

    .venv/bin/python benchmarks/dp_overhead.py [--batch 64] [--k 1] [--repeat 3] [--kinds loda lora ...]
    .venv/bin/python benchmarks/dp_overhead.py --sd [--sd-microbatch 1 2] [--sd-kind attention|lora ...]
        [--sd-dtype fp32|bf16] [--sd-max-microbatch [--sd-max-cap 1024]]   # SD-1.5-size U-Net, CPU or GPU

On a lent GPU (H100/H200), the one command for issue 13's figures (bf16 step, images/s DP vs non-DP LoRA,
the largest micro-batch that fits):

    .venv/bin/python benchmarks/dp_overhead.py --sd --sd-kind lora --sd-dtype bf16 --sd-microbatch 16 64 \
        --sd-max-microbatch

Estimate: the SD-1.5 U-Net forward at 32×32 latents is ~0.4 TFLOP per image, a training step ~3× that, so at
~300 TFLOP/s bf16 sustained a step costs ~4 ms per image (measured on an H200: 3.4 ms, non-DP LoRA at
micro-batch 64) and the run is dominated by ~25 fresh processes (8 for the timed micro-batches, ~4–6 per variant
for the search from 16 up to the 1024 cap, whose tries at 16 and 64 are the memory runs' own). Measured on an
H200 (2026-12-04): each child took ~27 s (import, CUDA init, U-Net build, the step; the large tries most), so
the whole command needs ~12 minutes: more than one 10-minute device call. There, run the timed part and the
search as two calls, or single tries by hand: `python3 benchmarks/dp_overhead.py --sd-child dp_ghost 576
--sd-kind lora --sd-dtype bf16` prints one try's JSON (peak_bytes, or the OOM).

The model is the default latent U-Net (`ModelConfig()`: UNet2DConditionModel, channels [64, 128],
cross-attention at the second level, MiniLM-sized 16×384 conditioning) on 8×8×4 latents. The quickstart
pretrains a narrower one ([32, 64], configs/pretrain_glyphs.yaml); its own DP step, with its adapter levels,
is timed by benchmarks/dp_microbatch.py. One step = the gradient of
one logical batch of `--batch` examples (K noise draws each), in one micro-batch of `--microbatch`:
- non-DP: plain backward of the summed diffusion loss, the module called directly, as
  `FinetuneTrainer._plain_grad_sum` (what `privacy.enabled=false` runs); the DP variants call it
  through `torch.func.functional_call`, as the trainer's DP path does,
- DP torch.func: `clipped_grad_sum` (vmap(grad)) + `add_noise_and_normalize`, as the trainer runs it,
- DP opacus hooks: `GradSampleModule` per-row gradients, an example's K rows summed, clipped,
- DP opacus ghost: opacus' `GradSampleModuleFastGradientClipping` (per-row norms from hooks, then a
  second backward of the reweighted loss); only with K = 1 (its norms are per row, not per example),
- DP ghost: `ghost_clipped_grad_sum` (dpldm/privacy/ghost_clipping.py), per-layer norms + book-keeping,
- DP ghost, 2nd bwd: the same norms, clipped sum by a second backward of the reweighted loss.
Every DP variant includes drawing and adding the noise (`add_noise_and_normalize`); that alone is
timed too ("noise draw"), since on one CPU thread it is a visible share of the step.
Timing: one process per kind builds the model once and runs the variants interleaved, round by
round (load drifts on a shared machine hit all alike); median over `--repeat` rounds after a
warm-up round. Memory: a fresh process per (kind, variant), growth of peak RSS during its first
step on CPU, of `torch.cuda.max_memory_allocated` on GPU. Prints a table and writes the
"DP overhead" section of docs/benchmarks.md (with `--sd`: the "DP at Stable-Diffusion scale" section).
`--sd-max-microbatch` (CUDA only): per SD variant, the micro-batch doubled from the smallest timed one until
torch.cuda.OutOfMemoryError (or `--sd-max-cap`), then bisected between the last fit and the first OOM to
within 10%; every try is a first step in a fresh process, so an OOM never poisons the next one.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

KINDS = ["loda", "lora", "attention", "full"]
VARIANTS = ["nondp", "dp", "dp_hooks", "dp_fgc", "dp_ghost", "dp_ghost_rw"]
LABELS = {"nondp": "non-DP", "dp": "DP torch.func", "dp_hooks": "DP opacus hooks", "dp_fgc": "DP opacus ghost",
          "dp_ghost": "DP ghost", "dp_ghost_rw": "DP ghost, 2nd bwd"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Setup:
    """The default U-Net (ModelConfig()) with one adapter kind, a fixed batch, and one step function per variant."""

    def __init__(self, kind: str, batch: int, k: int, microbatch: int, threads: int):
        import torch
        from torch.func import functional_call

        from dpldm.config import AdapterConfig, ModelConfig
        from dpldm.models.adapters import attach_adapter, trainable_named_parameters
        from dpldm.models.diffusion_loss import diffusion_loss
        from dpldm.models.pipeline import build_scheduler, build_unet
        from dpldm.privacy.dp_step import add_noise_and_normalize, clipped_grad_sum, noise_generator

        self.torch = torch
        self.device = device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(threads)    # a shared CPU: more threads than free cores is 10x slower
        torch.manual_seed(0)
        mc = ModelConfig()                    # the default U-Net shape (not the quickstart's [32, 64])
        unet = build_unet(mc, cross_attention_dim=384, latent_size=8).to(device)
        attach_adapter(unet, AdapterConfig(kind=kind))
        params = trainable_named_parameters(unet)
        self.trainable = sum(p.numel() for p in params.values())
        alphas = build_scheduler(mc).alphas_cumprod.to(device)
        x0 = torch.randn(batch, 4, 8, 8, device=device)
        cond = torch.randn(batch, 16, 384, device=device)
        t = torch.randint(0, mc.num_train_timesteps, (batch, k), device=device)
        noise = torch.randn(batch, k, 4, 8, 8, device=device)
        chunks = [(x0[s:s + microbatch], cond[s:s + microbatch], t[s:s + microbatch], noise[s:s + microbatch])
                  for s in range(0, batch, microbatch)]

        def plain(module):
            return lambda x_t, tt, c: module(x_t, tt, encoder_hidden_states=c, return_dict=False)[0]

        def loss_fn(p, x, c, tt, n):          # ONE example, as the trainer's
            call = lambda x_t, ts, cc: functional_call(unet, p, (x_t, ts), {"encoder_hidden_states": cc,
                                                                             "return_dict": False})[0]
            return diffusion_loss(call, alphas, x[None], c[None], tt[None], n[None])[0]

        def noised(gsum):
            return add_noise_and_normalize(gsum, 1.0, 1.0, float(batch), noise_generator(0, 0, device))

        def nondp():
            total = {n: torch.zeros_like(v) for n, v in params.items()}
            for ch in chunks:
                losses = diffusion_loss(plain(unet), alphas, *ch)
                for n, g in zip(total, torch.autograd.grad(losses.sum(), list(params.values()))):
                    total[n] += g
            return total

        def dp():
            return noised(clipped_grad_sum(loss_fn, params, (x0, cond, t, noise), 1.0, microbatch)[0])

        import copy

        from opacus import GradSampleModule
        # on a copy: backward hooks on a module break torch.func transforms over it, even when disabled
        gsm = GradSampleModule(copy.deepcopy(unet), batch_first=True, loss_reduction="sum")
        gsm_params = {n: p for n, p in gsm._module.named_parameters() if p.requires_grad}

        def dp_hooks():                       # opacus hooks: per-row grads, rows of one example summed
            total = {n: torch.zeros_like(v) for n, v in gsm_params.items()}
            try:
                for ch in chunks:
                    for p in gsm_params.values():
                        p.grad_sample = None
                    diffusion_loss(plain(gsm), alphas, *ch).sum().backward()
                    b = ch[0].shape[0]
                    gs = {n: p.grad_sample.reshape(b, k, *p.shape).sum(1) for n, p in gsm_params.items()}
                    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in gs.values()))
                    factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)
                    for n, g in gs.items():
                        total[n] += torch.einsum("b,b...->...", factor, g)
            finally:
                for p in gsm_params.values():
                    p.grad, p.grad_sample = None, None
            return noised(total)

        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        fgc = GradSampleModuleFastGradientClipping(copy.deepcopy(unet), batch_first=True, loss_reduction="sum",
                                                   strict=False, max_grad_norm=1.0, use_ghost_clipping=True)
        fgc_params = {n: p for n, p in fgc._module.named_parameters() if p.requires_grad}

        def dp_fgc():                         # opacus ghost clipping: norms per row, so K = 1 only
            if k != 1:
                return None
            total = {n: torch.zeros_like(v) for n, v in fgc_params.items()}
            try:
                for ch in chunks:
                    fgc.enable_hooks()
                    losses = diffusion_loss(plain(fgc), alphas, *ch)
                    losses.sum().backward(retain_graph=True)
                    coef = fgc.get_clipping_coef()
                    for p in fgc_params.values():
                        p.grad = None
                    fgc.disable_hooks()
                    (coef * losses).sum().backward()
                    for n, p in fgc_params.items():
                        total[n] += p.grad
                        p.grad = None
            finally:
                fgc.enable_hooks()
            return noised(total)

        from dpldm.privacy.ghost_clipping import ghost_clipped_grad_sum

        def batch_loss(p, x, c, tt, n):       # the micro-batch, as the ghost engine takes it
            call = lambda x_t, ts, cc: functional_call(unet, p, (x_t, ts), {"encoder_hidden_states": cc,
                                                                             "return_dict": False})[0]
            return diffusion_loss(call, alphas, x, c, tt, n)

        def dp_ghost(sum_mode="bookkeeping"):
            return noised(ghost_clipped_grad_sum(unet, params, batch_loss, (x0, cond, t, noise), 1.0, microbatch,
                                                 sum_mode=sum_mode)[0])

        self.steps = {"nondp": nondp, "dp": dp, "dp_hooks": dp_hooks, "dp_fgc": dp_fgc, "dp_ghost": dp_ghost,
                      "dp_ghost_rw": lambda: dp_ghost("reweight"),
                      "noise": lambda: noised({n: torch.zeros_like(v) for n, v in params.items()})}

    def timed(self, variant: str) -> float:
        cuda = self.device.type == "cuda"
        if cuda:
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.steps[variant]()
        if cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure_time(kind: str, batch: int, k: int, microbatch: int, repeat: int, threads: int) -> dict:
    """Median step time of every variant, interleaved round by round (so load drifts hit all alike)."""
    setup = Setup(kind, batch, k, microbatch, threads)
    variants = [v for v in VARIANTS if applies(v, k)] + ["noise"]
    times = {v: [] for v in variants}
    for rnd in range(repeat + 1):
        for v in variants:
            t = setup.timed(v)
            if rnd:                           # round 0 is the warm-up
                times[v].append(t)
    return {"trainable": setup.trainable, **{v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}}


def applies(variant: str, k: int) -> bool:
    return variant != "dp_fgc" or k == 1


def peak_growth(torch, device, step) -> int:
    """Bytes by which one call of `step` raises the peak (CUDA allocator, or process RSS on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    before = _rss_bytes()
    step()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def measure_memory(kind: str, variant: str, batch: int, k: int, microbatch: int, threads: int) -> dict:
    """Peak memory growth of one (first) step of `variant` in a fresh process."""
    setup = Setup(kind, batch, k, microbatch, threads)
    return {"peak_bytes": peak_growth(setup.torch, setup.device, lambda: setup.timed(variant))}


def run_child(what: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--child", *what, "--batch", str(args.batch), "--k", str(args.k),
           "--microbatch", str(args.microbatch), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"dp_overhead: {' '.join(what)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(value, base, unit: str, scale: float) -> str:
    if value is None:
        return "n/a"
    v = value * scale
    ratio = f" ({value / max(base, 1e-12):.2f}×)" if base is not None else ""
    return (f"{v:.1f}" if v < 100 else f"{v:.0f}") + f" {unit}{ratio}"


def table(results: dict, args) -> str:
    dp = VARIANTS[1:]
    lines = ["| adapter | trainable params | non-DP step | " + " | ".join(LABELS[v] for v in dp)
             + " | noise draw (in every DP step) |", "|---" + "|---:" * (len(dp) + 3) + "|"]
    for kind in args.kinds:
        r = results[kind]
        lines.append(f"| {kind} | {r['trainable']:,} | {r['nondp'] * 1e3:.0f} ms | "
                     + " | ".join(_cell(r.get(v), r["nondp"], "ms", 1e3) for v in dp + ["noise"]) + " |")
    lines += ["", "| adapter | non-DP peak mem | " + " | ".join(LABELS[v] for v in dp) + " |",
              "|---" + "|---:" * (len(dp) + 1) + "|"]
    for kind in args.kinds:
        r = results[kind]
        lines.append(f"| {kind} | {r['mem_nondp'] / 2**20:.0f} MiB | "
                     + " | ".join(_cell(r.get("mem_" + v), r["mem_nondp"], "MiB", 2**-20) for v in dp) + " |")
    note = ("Default U-Net (`ModelConfig()`: channels [64, 128], cross-attention at level 2; the quickstart pretrains "
            "a narrower [32, 64] one, timed in section \"DP step by micro-batch\"), 8×8×4 latents, batch "
            f"{args.batch}, K={args.k}, micro-batch {args.microbatch}, {args.threads} CPU thread(s); median of "
            f"{args.repeat} interleaved rounds after a warm-up round; first table step time, second peak "
            f"memory (× = over non-DP). Non-DP: the module called directly, as the trainer's non-private "
            f"step (`FinetuneTrainer._plain_grad_sum`); the DP variants run it through "
            f"`torch.func.functional_call`, as the trainer's DP step. {LABELS['dp']}: `clipped_grad_sum` "
            f"(torch.func vmap(grad)); "
            f"{LABELS['dp_hooks']}: opacus `GradSampleModule` (an example's K rows' grad samples summed, then "
            f"clipped); {LABELS['dp_fgc']}: opacus `GradSampleModuleFastGradientClipping` (per-row norms, so "
            f"n/a for K > 1); {LABELS['dp_ghost']}: `ghost_clipped_grad_sum`, per-layer norms from activations "
            f"and output gradients + book-keeping sum, one backward; {LABELS['dp_ghost_rw']}: the same norms, "
            "sum by a second backward of the reweighted loss. All DP variants add the noise once "
            "(`add_noise_and_normalize`, one N(0, σ²C²) draw per trainable parameter); the last column times "
            "that alone. Peak memory: "
            "growth of peak RSS (CPU) or of max_memory_allocated (GPU) during a first step, in a fresh process. "
            f"Load average at the start of the run: {args.load_start:.1f} on {os.cpu_count()} cores (a shared "
            "machine: timings are noisy). Reproduce: `.venv/bin/python benchmarks/dp_overhead.py`.")
    return "\n".join(lines) + "\n\n" + note


# -- Stable-Diffusion scale (--sd) ----------------------------------------------------------------

SD15_UNET = dict(                         # the public SD-1.5 unet/config.json, typed in (random weights)
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD_VARIANTS = ["nondp", "dp", "dp_ghost"]


def sd_steps(microbatch: int, threads: int, kind: str, dtype: str):
    """The SD-1.5-size U-Net (`kind` adapter, `dtype` weights and inputs, 32×32×4 latents, 77×768 text
    states, K = 1), its facts, and one step function per SD variant (gradient of one micro-batch)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.func import functional_call

    from dpldm.config import AdapterConfig, ModelConfig
    from dpldm.models.adapters import attach_adapter, trainable_named_parameters
    from dpldm.models.diffusion_loss import diffusion_loss
    from dpldm.models.pipeline import build_scheduler
    from dpldm.privacy.dp_step import clipped_grad_sum
    from dpldm.privacy.ghost_clipping import ghost_clipped_grad_sum
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    with device:                              # built in place: a 1-thread CPU init of 860M weights takes seconds
        unet = UNet2DConditionModel(**SD15_UNET)
    attach_adapter(unet, AdapterConfig(kind=kind))
    unet.to(dt)                               # bf16: the whole U-Net cast, as DeepSpeed's bf16 mode runs it
    params = trainable_named_parameters(unet)
    alphas = build_scheduler(ModelConfig()).alphas_cumprod.to(device)
    b = microbatch
    batch = (torch.randn(b, 4, 32, 32, device=device, dtype=dt), torch.randn(b, 77, 768, device=device, dtype=dt),
             torch.randint(0, 1000, (b, 1), device=device), torch.randn(b, 1, 4, 32, 32, device=device, dtype=dt))

    def batch_loss(p, x, c, tt, n):
        call = lambda x_t, ts, cc: functional_call(unet, p, (x_t, ts), {"encoder_hidden_states": cc,
                                                                         "return_dict": False})[0]
        return diffusion_loss(call, alphas, x, c, tt, n)

    def synced(fn):
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run
    steps = {
        "nondp": lambda: torch.autograd.grad(batch_loss(dict(params), *batch).sum(), list(params.values())),
        "dp": lambda: clipped_grad_sum(lambda p, *ex: batch_loss(p, *(t[None] for t in ex))[0], params, batch,
                                       1.0, b),
        "dp_ghost": lambda: ghost_clipped_grad_sum(unet, params, batch_loss, batch, 1.0, b)}
    facts = {"trainable": sum(p.numel() for p in params.values()), "total": sum(p.numel() for p in unet.parameters()),
             "weights_bytes": sum(p.numel() * p.element_size() for p in unet.parameters()),
             "device": f"CPU, {threads} thread(s)"}
    if device.type == "cuda":
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        facts["device"] = f"{torch.cuda.get_device_name()} ({gib:.0f} GiB)"
    return torch, device, facts, {k: synced(v) for k, v in steps.items()}


def _failure(torch, e: Exception) -> dict:
    """A failed step as a record: its one-line message; the traceback goes to stderr (the parent shows it)
    unless it is an OOM (the --sd-max-microbatch search's signal)."""
    oom = isinstance(e, torch.cuda.OutOfMemoryError)
    if not oom:
        traceback.print_exc()
    return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", "oom": oom}


def measure_sd(what: str, microbatch: int, threads: int, repeat: int, kind: str, dtype: str) -> dict:
    """what = 'time': median of every SD variant interleaved over `repeat` rounds after a warm-up;
    what = a variant: peak memory growth of its first step (a fresh process per call).
    A variant whose step raises is recorded as failed (its message) and the others carry on."""
    torch, device, facts, steps = sd_steps(microbatch, threads, kind, dtype)
    if what != "time":
        try:
            return {**facts, "peak_bytes": peak_growth(torch, device, steps[what])}
        except Exception as e:
            return {**facts, **_failure(torch, e)}
    times, errors = {v: [] for v in SD_VARIANTS}, {}
    for rnd in range(repeat + 1):
        for v in [v for v in SD_VARIANTS if v not in errors]:
            t0 = time.perf_counter()
            try:
                steps[v]()
            except Exception as e:
                errors[v] = _failure(torch, e)["error"]
                continue
            if rnd:
                times[v].append(time.perf_counter() - t0)
    return {**facts, "errors": errors, **{v: sorted(ts)[len(ts) // 2] if ts else None for v, ts in times.items()}}


def sd_child(what: str, mb: int, args) -> dict:
    """One --sd measurement (`what` = 'time' or a variant, at micro-batch `mb`) in a fresh process."""
    cmd = [sys.executable, __file__, "--sd-child", what, str(mb), "--threads", str(args.threads),
           "--repeat", str(args.sd_repeat), "--sd-kind", args.sd_kind, "--sd-dtype", args.sd_dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"dp_overhead --sd: {what} micro-batch {mb} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r.get("errors") or (r.get("error") and not r["oom"]):
        print(out.stderr[-6000:], file=sys.stderr, flush=True)     # the failing variant's traceback
    return r


def max_microbatch(variant: str, res: dict, args) -> str:
    """The largest micro-batch whose first step of `variant` completes, as a table cell: doubled from the
    smallest --sd-microbatch (already measured) until a try fails (OOM) or reaches --sd-max-cap, then bisected
    between the last fit and the first failure to within 10% (from 0 if the smallest fails). Each try is a
    memory child (a fresh process); those --sd-microbatch ran are reused."""
    tries = {mb: r for (what, mb), r in res.items() if what == variant}

    def fits(mb: int) -> bool:
        if mb not in tries:
            tries[mb] = sd_child(variant, mb, args)
            print(f"SD max micro-batch, {LABELS[variant]}, {mb}: {tries[mb].get('error', 'fits')}", flush=True)
        return "error" not in tries[mb]
    fit, bad, mb = 0, None, min(args.sd_microbatch)
    while bad is None and fit < args.sd_max_cap:
        if fits(mb):
            fit, mb = mb, min(2 * mb, args.sd_max_cap)
        else:
            bad = mb
    while bad is not None and bad - fit > max(1, fit / 10):
        mid = (fit + bad) // 2
        if fits(mid):
            fit = mid
        else:
            bad = mid
    cell = f"{fit} ({tries[fit]['peak_bytes'] / 2**30:.1f} GiB)" if fit else "none"
    if bad is None:
        return f"≥ {cell} (the cap)"
    return cell if tries[bad]["oom"] else f"{cell}; at {bad}: {tries[bad]['error']}"


def sd_command(args) -> str:
    """The command line that reproduces this --sd run (every flag that shapes it)."""
    cmd = (f".venv/bin/python benchmarks/dp_overhead.py --sd --sd-kind {args.sd_kind} --sd-dtype {args.sd_dtype} "
           f"--sd-microbatch {' '.join(map(str, args.sd_microbatch))} --sd-repeat {args.sd_repeat} "
           f"--threads {args.threads}")
    return cmd + (f" --sd-max-microbatch --sd-max-cap {args.sd_max_cap}" if args.sd_max_microbatch else "")


def _rate(images: int, seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    r = images / seconds
    return f"{r:.2f}" if r < 10 else f"{r:.0f}"


def sd_section(args) -> str:
    import torch
    cuda = torch.cuda.is_available()          # no CUDA context in this process: the children get the whole GPU
    if args.sd_max_microbatch and not cuda:
        print("dp_overhead --sd-max-microbatch: CUDA only (it searches for torch.cuda.OutOfMemoryError); "
              "skipped on this CPU", flush=True)
    res, load = {}, os.getloadavg()[0]
    for mb in args.sd_microbatch:
        for what in ["time"] + SD_VARIANTS:
            res[what, mb] = sd_child(what, mb, args)
            print(f"SD micro-batch {mb} {what}: {res[what, mb]}", flush=True)
    maxes = {v: max_microbatch(v, res, args) for v in SD_VARIANTS} if args.sd_max_microbatch and cuda else {}
    failed = {v: r["errors"][v] for (what, _), r in res.items() if what == "time" for v in r["errors"]}
    failed.update({v: r["error"] for (v, _), r in res.items() if r.get("error") and not r["oom"] and v not in failed})
    any_r, unit = next(iter(res.values())), ("ms", 1e3) if cuda else ("s", 1)
    lines = ["| micro-batch | " + " | ".join(f"{LABELS[v]} time" for v in SD_VARIANTS) + " | "
             + " | ".join(f"{LABELS[v]} images/s" for v in SD_VARIANTS) + " | "
             + " | ".join(f"{LABELS[v]} peak mem" for v in SD_VARIANTS) + " |",
             "|---" + "|---:" * (3 * len(SD_VARIANTS)) + "|"]
    for mb in args.sd_microbatch:
        base, tm = res["nondp", mb], res["time", mb]
        lines.append(f"| {mb} | " + " | ".join(_cell(tm[v], tm["nondp"], *unit) for v in SD_VARIANTS)
                     + " | " + " | ".join(_rate(mb, tm[v]) for v in SD_VARIANTS)
                     + " | " + " | ".join(_cell(res[v, mb].get("peak_bytes"), base.get("peak_bytes"), "MiB", 2**-20)
                                          for v in SD_VARIANTS) + " |")
    if maxes:
        lines += ["", "| | " + " | ".join(LABELS[v] for v in SD_VARIANTS) + " |",
                  "|---" + "|---:" * len(SD_VARIANTS) + "|",
                  "| largest micro-batch that fits (its step's peak memory) | "
                  + " | ".join(maxes[v] for v in SD_VARIANTS) + " |"]
    fit = []
    if len(args.sd_microbatch) >= 2 and not cuda:   # this machine's 24 GiB; on a GPU the search measures the limit
        lo, hi = min(args.sd_microbatch), max(args.sd_microbatch)
        for v in [v for v in SD_VARIANTS if "peak_bytes" in res[v, lo] and "peak_bytes" in res[v, hi]]:
            slope = (res[v, hi]["peak_bytes"] - res[v, lo]["peak_bytes"]) / (hi - lo)
            fixed = res[v, lo]["peak_bytes"] - slope * lo + any_r["weights_bytes"] + 8 * any_r["trainable"]
            room = 24 * 2**30 - fixed
            fit.append(f"{LABELS[v]}: {fixed / 2**30:.1f} GiB + {slope / 2**30:.2f} GiB per example → "
                       + (f"micro-batch ≤ {int(room // slope)}" if slope > 0 and room > 0 else "does not fit"))
    peak = "torch.cuda.max_memory_allocated" if cuda else "peak RSS"
    note = (f"UNet2DConditionModel with the public SD-1.5 unet config typed in `benchmarks/dp_overhead.py` "
            f"(random weights, {any_r['total'] / 1e6:.0f}M parameters, {any_r['weights_bytes'] / 2**30:.2f} GiB "
            f"in {args.sd_dtype}), {args.sd_kind} adapter ({any_r['trainable'] / 1e6:.1f}M trainable), "
            f"32×32×4 latents (256×256 images), 77×768 text states, K = 1, {args.sd_dtype} (U-Net and inputs), "
            f"on {any_r['device']}. One step = gradient of one micro-batch (noise and optimizer excluded); "
            "images/s = micro-batch / step time. Peak memory: growth of "
            f"{peak} during the first step (weights excluded), each (variant, micro-batch) in a fresh process; "
            f"time: median of {args.sd_repeat} interleaved rounds after a warm-up, one process per micro-batch; "
            f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} "
            "cores. "
            + ("Largest micro-batch: doubled from the smallest timed micro-batch until "
               "torch.cuda.OutOfMemoryError (or the cap), then bisected to within 10%, each try a first step in "
               "a fresh process. " if maxes else "")
            + "".join(f"{LABELS[v]} failed in {args.sd_dtype}: {msg}. " for v, msg in failed.items())
            + f"Reproduce: `{sd_command(args)}`. "
            + (f"In 24 GiB ({args.sd_dtype} weights + fp32 Adam state of the trainable parameters + the linear "
               "fit of the micro-batches' step memory): " + "; ".join(fit) + "." if fit else ""))
    return "\n".join(lines) + "\n\n" + note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=1, help="noise multiplicity K")
    p.add_argument("--microbatch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (ignored on GPU)")
    p.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--child", nargs=2, metavar=("KIND", "time|VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--sd", action="store_true", help="only the SD-1.5-size U-Net step (minutes; several GiB)")
    p.add_argument("--sd-microbatch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sd-repeat", type=int, default=2, help="timed rounds per SD micro-batch")
    p.add_argument("--sd-kind", default="attention", choices=KINDS, help="SD adapter kind (AdapterConfig defaults)")
    p.add_argument("--sd-dtype", default="fp32", choices=["fp32", "bf16"], help="SD U-Net and input dtype")
    p.add_argument("--sd-max-microbatch", action="store_true",
                   help="CUDA only: search the largest SD micro-batch that fits, per variant")
    p.add_argument("--sd-max-cap", type=int, default=1024, help="largest micro-batch the search tries")
    p.add_argument("--sd-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sd_child:
        print(json.dumps(measure_sd(args.sd_child[0], int(args.sd_child[1]), args.threads, args.repeat,
                                    args.sd_kind, args.sd_dtype)))
        return
    if args.sd:
        text = sd_section(args)
        print("\n" + text)
        if not args.no_doc:
            from common import write_section
            import torch                  # one section per device kind: a GPU run keeps the CPU figures
            write_section("DP at Stable-Diffusion scale" + (" on a GPU" if torch.cuda.is_available() else ""), text)
        return
    if args.child:
        kind, what = args.child
        r = (measure_time(kind, args.batch, args.k, args.microbatch, args.repeat, args.threads) if what == "time"
             else measure_memory(kind, what, args.batch, args.k, args.microbatch, args.threads))
        print(json.dumps(r))
        return
    results = {}
    args.load_start = os.getloadavg()[0]
    for kind in args.kinds:
        r = run_child([kind, "time"], args)
        for v in VARIANTS:
            if applies(v, args.k):
                r["mem_" + v] = run_child([kind, v], args)["peak_bytes"]
        results[kind] = r
        print(f"{kind:9s} " + "  ".join(f"{v} {r[v] * 1e3:.0f} ms / {r['mem_' + v] / 2**20:.0f} MiB"
                                        for v in VARIANTS if v in r) + f"  noise {r['noise'] * 1e3:.0f} ms",
              flush=True)
    text = table(results, args)
    print("\n" + text)
    if not args.no_doc:
        from common import write_section
        write_section("DP overhead", text)


if __name__ == "__main__":
    main()
