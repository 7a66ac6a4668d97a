"""The DP-SGD gradient: per-example clipped sums (torch.func), Gaussian noise once per logical step.

One logical step, on any number of ranks and micro-batches:

    grad_sum, stats = clipped_grad_sum(loss_fn, params, batch, max_grad_norm=C, microbatch_size=64)
    # ... all-reduce (sum) grad_sum over ranks; then, identically on every rank:
    gen = noise_generator(seed, step, device=...)
    grads = add_noise_and_normalize(grad_sum, sigma, C, expected_batch_size=q * N, generator=gen)

`loss_fn(params, *example)` is the loss of ONE example (no batch dimension): for diffusion it is
already the mean over the example's K noise-multiplicity draws, so clipping bounds the averaged
gradient (DPDM). Each example's gradient over all trainable parameters together is clipped to
norm <= C, summed; the sum does not depend on `microbatch_size`. With `clip_groups` (a partition of
the parameter names into G groups) each group of an example's gradient is clipped to C/√G instead
(per-layer clipping, McMahan et al. 2018): the example's whole clipped gradient still has norm <= C,
so the sensitivity, the noise and the accounting are unchanged. Groups keep a small group (e.g. the
cross-attention that reads the condition) from being drowned by the clipping of a large one.
Noise N(0, σ²C²) is added once to the global sum, and the result is divided by the *expected* batch
size q·N, not the drawn one.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dpldm.errors import DpldmError
from dpldm.rng import NoiseStream, RunRandomness

_CLIP_EPS = 1e-6   # as in opacus: factor = C / (norm + eps), capped at 1


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def clip_group_index(names: list[str], clip_groups: Sequence[Sequence[str]] | None) -> list[int]:
    """Group number of each parameter name; one group (all zeros) when clip_groups is None.
    `clip_groups` must partition `names` exactly (every name in one group, no group empty)."""
    if clip_groups is None:
        return [0] * len(names)
    owner = {}
    for g, members in enumerate(clip_groups):
        if not members:
            raise DpldmError(f"dp step: clip group {g} is empty")
        for name in members:
            if name in owner:
                raise DpldmError(f"dp step: parameter {name!r} is in clip groups {owner[name]} and {g}")
            owner[name] = g
    missing, extra = [n for n in names if n not in owner], [n for n in owner if n not in names]
    if missing or extra:
        raise DpldmError(f"dp step: clip_groups must partition the trainable parameters exactly; "
                         f"missing {missing[:3]}, unknown {extra[:3]}")
    return [owner[n] for n in names]


def _finite_examples(group_norms: Tensor, losses: Tensor) -> Tensor:
    """[b] True where the example's loss and every group norm ([G, b]) are finite."""
    return torch.isfinite(group_norms).all(0) & torch.isfinite(losses.detach().reshape(-1)).to(group_norms.device)


def _zero_rows(g: Tensor, keep: Tensor) -> Tensor:
    """g [b, ...] with the rows where `keep` [b] is False set to exactly zero (NaN/Inf included)."""
    mask = keep.reshape(-1, *([1] * (g.dim() - 1))).to(g.device)
    return torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))


def check_clip_args(max_grad_norm, microbatch_size, batch: tuple[Tensor, ...], who: str) -> int:
    """The batch size, after one-line DpldmErrors (prefixed `who`) for arguments no clipping engine can take."""
    if isinstance(microbatch_size, bool) or int(microbatch_size) != microbatch_size or microbatch_size < 1:
        raise DpldmError(f"{who}: microbatch_size must be an integer >= 1; got {microbatch_size!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise DpldmError(f"{who}: max_grad_norm must be > 0 (or None for no clipping); got {max_grad_norm!r}")
    if not batch or not all(isinstance(t, Tensor) for t in batch):
        raise DpldmError(f"{who}: batch must be a non-empty tuple of tensors indexed along dim 0")
    n = batch[0].shape[0]
    if any(t.shape[0] != n for t in batch):
        raise DpldmError(f"{who}: batch tensors disagree on the batch size: {[t.shape[0] for t in batch]}")
    return int(n)


def clipped_grad_sum(loss_fn: Callable[..., Tensor], params: Mapping[str, Tensor],
                     batch: tuple[Tensor, ...], max_grad_norm: float | None,
                     microbatch_size: int,
                     clip_groups: Sequence[Sequence[str]] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Sum over the batch of per-example gradients, each clipped to norm <= max_grad_norm
    (or, with clip_groups, each of its G groups clipped to max_grad_norm/√G).

    Returns (grad_sum keyed like `params`, stats {"n", "loss_sum", "grad_norm_sum", "clipped"}),
    where grad_norm_sum sums the unclipped per-example norms and clipped counts the examples whose
    gradient (or any of its groups) was scaled down.

    Non-finite examples: an example whose loss or gradient norm (of any clip group) is NaN/Inf (a
    float32 norm that overflows counts as Inf) contributes zero — factor 0, so its contribution is
    still bounded by C and the sum stays finite — and is left out of loss_sum and grad_norm_sum. How
    many were dropped is NOT counted anywhere: it is a statistic of the private batch (privacy invariant 8,
    docs/privacy.md).
    """
    n = check_clip_args(max_grad_norm, microbatch_size, batch, "dp step")
    frozen = {k: v.detach() for k, v in params.items()}
    group_of = dict(zip(frozen, clip_group_index(list(frozen), clip_groups)))
    n_groups = max(group_of.values(), default=0) + 1
    group_clip = None if max_grad_norm is None else max_grad_norm / np.sqrt(n_groups)
    grad_sum = {k: torch.zeros_like(v, dtype=_accumulation_dtype(v)) for k, v in frozen.items()}
    any_param = next(iter(frozen.values()), None)
    device = any_param.device if any_param is not None else torch.device("cpu")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    norm_sum = torch.zeros((), dtype=torch.float64, device=device)
    clipped = torch.zeros((), dtype=torch.int64, device=device)
    per_example = torch.func.vmap(torch.func.grad_and_value(loss_fn), in_dims=(None,) + (0,) * len(batch),
                                  randomness="different")
    for start in range(0, n, int(microbatch_size)):
        chunk = tuple(t[start:start + int(microbatch_size)] for t in batch)
        grads, losses = per_example(frozen, *chunk)
        b = len(chunk[0])
        sq = torch.zeros(n_groups, b, dtype=torch.float32, device=device)
        for k, g in grads.items():
            sq[group_of[k]] += g.reshape(b, -1).to(torch.float32).pow(2).sum(1)
        group_norms = sq.sqrt()                                        # [G, b]
        finite = _finite_examples(group_norms, losses)                 # [b] bool
        group_norms = torch.where(finite, group_norms, torch.zeros_like(group_norms))
        norms = sq.sum(0).sqrt().where(finite, torch.zeros_like(finite, dtype=sq.dtype))
        if group_clip is None:
            factor = torch.ones_like(group_norms)
        else:
            factor = (group_clip / (group_norms + _CLIP_EPS)).clamp(max=1.0)
            clipped += (group_norms > group_clip).any(0).sum()
        factor = factor * finite                                       # non-finite example: factor 0
        for k, g in grads.items():
            f = factor[group_of[k]].to(grad_sum[k].dtype)
            g = _zero_rows(g.to(grad_sum[k].dtype), finite)           # 0 · NaN would still be NaN
            grad_sum[k].add_(torch.einsum("b,b...->...", f, g))
        loss_sum += torch.where(finite, losses.detach().to(torch.float64), 0.0).sum()
        norm_sum += norms.to(torch.float64).sum()
    stats = {"n": int(n), "loss_sum": float(loss_sum), "grad_norm_sum": float(norm_sum),
             "clipped": int(clipped)}
    return grad_sum, stats


def noise_generator(seed: int, step: int, device: str | torch.device = "cpu", secure: bool = False) -> NoiseStream:
    """The DP noise of logical step `step`: the run seed's ("noise", step) stream (dpldm/rng.py).

    The same draws on every rank of one device type; `secure=True` draws from a SHAKE-256 keystream
    (privacy.secure_rng). The seed must be secret (docs/privacy.md): whoever has it can subtract the noise.
    """
    if int(step) < 0:
        raise DpldmError(f"dp step: noise step must be >= 0; got step={step}")
    return NoiseStream(RunRandomness(int(seed)), "noise", int(step), device=device, secure=secure)


def add_noise_and_normalize(grad_sum: Mapping[str, Tensor], noise_multiplier: float,
                            max_grad_norm: float | None, expected_batch_size: float,
                            generator: NoiseStream) -> dict[str, Tensor]:
    """(grad_sum + N(0, σ²C²) per coordinate) / expected_batch_size; call once per logical step.

    Noise is drawn in float32 on the generator's device, parameters in sorted-name order, so every
    rank holding the same generator adds the same noise (and `generator.checksum` says so).
    """
    if not noise_multiplier >= 0:
        raise DpldmError(f"dp step: noise_multiplier must be >= 0; got {noise_multiplier!r}")
    if noise_multiplier > 0 and max_grad_norm is None:
        raise DpldmError("dp step: noise needs a clipping norm (max_grad_norm is None)")
    if not expected_batch_size > 0:
        raise DpldmError(f"dp step: expected_batch_size must be > 0; got {expected_batch_size!r}")
    std = float(noise_multiplier) * float(max_grad_norm or 0.0)
    out: dict[str, Tensor] = {}
    for name in sorted(grad_sum):
        g = grad_sum[name]
        if std > 0:   # g + σC·z in one pass (float32 or g's wider dtype), then divided in place: no temporaries
            g = torch.add(g, generator.normal(g.shape).to(device=g.device), alpha=std).to(g.dtype)
            out[name] = g.div_(expected_batch_size)
        else:
            out[name] = g / expected_batch_size
    return {k: out[k] for k in grad_sum}


def assert_dp_compatible(module: nn.Module, params: Mapping[str, Tensor] | None = None) -> None:
    """DpldmError if `module` would leak private data outside DP or break per-example gradients.

    Rejects BatchNorm (running statistics are computed from private data without noise, and batch
    statistics mix examples) and InstanceNorm tracking running stats. With `params` (the trainable
    parameters handed to `clipped_grad_sum`, named as in `module.named_parameters()`), also rejects
    a parameter that requires grad but is not in `params` (it would be trained without DP).
    """
    for name, m in module.named_modules():
        where = name or type(module).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise DpldmError(f"dp step: module '{where}' is a {type(m).__name__}: its statistics leak private "
                             "data and mix examples; use GroupNorm/LayerNorm")
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise DpldmError(f"dp step: module '{where}' ({type(m).__name__}) tracks running statistics, which "
                             "leak private data; set track_running_stats=False")
    if params is None:
        return
    named = dict(module.named_parameters())
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise DpldmError(f"dp step: params not found in the module: {', '.join(unknown[:5])}"
                         + (" ..." if len(unknown) > 5 else ""))
    outside = sorted(k for k, p in named.items() if p.requires_grad and k not in params)
    if outside:
        raise DpldmError(f"dp step: {len(outside)} parameter(s) require grad but are not DP-trained, e.g. "
                         f"{', '.join(outside[:3])}; freeze them (requires_grad_(False)) or include them")
