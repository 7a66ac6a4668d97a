"""Per-example clipping without per-example gradients of the whole model: ghost norms + book-keeping.

    grad_sum, stats = ghost_clipped_grad_sum(module, params, loss_fn, batch, max_grad_norm=C,
                                             microbatch_size=64, clip_groups=None)

`loss_fn(params, *chunk) -> Tensor[b]` is the *batched* functional loss: it runs `module` with
`params` swapped in (torch.func.functional_call) on a micro-batch of b examples and returns one
loss per example (for diffusion, the mean over the example's K noise draws; inside, the module
sees b·K rows, example-major). The result is exactly that of dp_step.clipped_grad_sum on the same
draws: each example's gradient (its K rows summed into ONE per-example gradient), each clip group
clipped to C/√G (group norm² = Σ of its parameters' squared norms), summed over the batch, in
micro-batches; the same return (grad_sum keyed like params; stats n, loss_sum, grad_norm_sum,
clipped). An example whose gradient norm (any group) is NaN/Inf contributes zero (factor 0, never
NaN); it is counted in `clipped`, and its loss and norm are left out of loss_sum / grad_norm_sum.

How (per micro-batch): one forward with a tap on every trainable Linear / Conv2d / GroupNorm /
LayerNorm (per_layer_norms.py), one backward that stops at the taps (no parameter gradient is
computed): each layer's per-example squared norm comes from its input and output gradient (ghost
or materialised form, whichever is smaller), then the clip factors f_i, then
  - "bookkeeping" (default): Σ_i f_i·grad_i per layer from the stored input/output gradient with
    each example's rows scaled by f_i (Bu et al. 2023) — no second backward;
  - "reweight": a second backward of Σ_i f_i·loss_i (ghost clipping, Li et al. 2021; flat clipping
    only, since one backward carries one factor per example).
Parameters of any other module (or of a layer called in an unsupported way) get exact per-example
gradients from torch.func vmap(grad) (the dp_step path), restricted to those parameters, and join the
same norms; a one-line GhostClippingNotice names them.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dpldm.errors import DpldmError
from dpldm.privacy.dp_step import check_clip_args, clip_group_index
from dpldm.privacy.per_layer_norms import Site, Tap, site_kind, why_unsupported

CLIP_EPS = 1e-6          # as dp_step and opacus: factor = C / (norm + eps), capped at 1
ENGINES = ("auto", "ghost", "vmap")


class GhostClippingNotice(UserWarning):
    """Some trainable parameters use the torch.func path inside the ghost engine."""


@dataclass
class GhostPlan:
    """Which trainable parameters the hooks handle (sites) and which fall back to torch.func."""
    sites: list[Site]
    fallback: dict[str, str] = field(default_factory=dict)     # parameter name -> why

    @property
    def hooked(self) -> list[str]:
        return [n for s in self.sites for n in s.roles.values()]

    def notice(self) -> str | None:
        if not self.fallback:
            return None
        kinds = sorted(set(self.fallback.values()))
        names = list(self.fallback)
        return (f"ghost clipping: {len(names)} trainable parameter(s) ({', '.join(kinds)}; e.g. {names[0]}) "
                "use the exact torch.func per-example path")


def plan_sites(module: nn.Module, params: Mapping[str, Tensor]) -> GhostPlan:
    """Assign every trainable parameter in `params` (named as in module.named_parameters()) to a
    hooked layer or to the torch.func fallback. Raises DpldmError for names the module lacks."""
    canonical = {id(p): n for n, p in module.named_parameters()}
    unknown = [n for n in params if n not in canonical.values()]
    if unknown:
        raise DpldmError(f"ghost clipping: params not found in the module: {', '.join(unknown[:3])}")
    owners: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in module.named_modules(remove_duplicate=False):
        for role, p in m._parameters.items():
            if p is not None and canonical.get(id(p)) in params:
                owners.setdefault(canonical[id(p)], []).append((mname, m, role))
    sites: dict[int, Site] = {}
    fallback: dict[str, str] = {}
    for name in params:
        own = owners.get(name, [])
        if len(own) != 1:
            fallback[name] = "shared parameter" if own else "parameter outside any submodule"
            continue
        mname, m, role = own[0]
        kind = site_kind(m)
        if kind is None or role not in ("weight", "bias"):
            fallback[name] = why_unsupported(m)
            continue
        site = sites.setdefault(id(m), Site(mname, m, kind, {}))
        site.roles[role] = name
    return GhostPlan(list(sites.values()), fallback)


def supports(module: nn.Module, params: Mapping[str, Tensor]) -> bool:
    """True when the hooks handle every trainable parameter (no torch.func fallback needed)."""
    return not plan_sites(module, params).fallback


def choose_engine(requested: str, module: nn.Module, params: Mapping[str, Tensor]) -> tuple[str, str]:
    """('ghost' | 'vmap', one line for the run log) for privacy.clipping = auto | ghost | vmap.

    auto: ghost whenever the hooks handle at least one trainable parameter (measured faster and
    smaller than vmap for every adapter kind, docs/benchmarks.md); vmap when they handle none."""
    if requested not in ENGINES:
        raise DpldmError(f"privacy.clipping must be one of {', '.join(ENGINES)}; got {requested!r}")
    if requested == "vmap":
        return "vmap", "clipping engine: vmap (torch.func per-example gradients)"
    plan = plan_sites(module, params)
    n_hooked = len(plan.hooked)
    if requested == "auto" and n_hooked == 0:
        return "vmap", "clipping engine: vmap (auto: no trainable Linear/Conv2d/GroupNorm/LayerNorm parameter)"
    line = (f"clipping engine: ghost ({'auto' if requested == 'auto' else 'requested'}; {n_hooked} parameter(s) "
            f"by per-layer norms + book-keeping, {len(plan.fallback)} by torch.func)")
    return "ghost", line


def _check_args(max_grad_norm, microbatch_size, batch, sum_mode: str, norm_form: str) -> int:
    n = check_clip_args(max_grad_norm, microbatch_size, batch, "ghost clipping")
    if sum_mode not in ("bookkeeping", "reweight"):
        raise DpldmError(f"ghost clipping: sum_mode must be 'bookkeeping' or 'reweight'; got {sum_mode!r}")
    if norm_form not in ("auto", "ghost", "materialise"):
        raise DpldmError(f"ghost clipping: norm_form must be auto, ghost or materialise; got {norm_form!r}")
    return n


@contextlib.contextmanager
def _tapped(sites: list[Site], b: int, anchor: Tensor, state: dict):
    """Forward hooks that record each site's inputs and wrap its output in a Tap."""
    def make(site: Site):
        def hook(mod, args, out):
            a = args[0] if args else None
            rows = state["rows"]
            if not isinstance(a, Tensor) or not isinstance(out, Tensor) or a.dim() < 2 or a.shape[0] % b \
                    or out.shape[0] != a.shape[0] or (rows is not None and a.shape[0] != rows * b):
                site.valid = False
                return None
            call = len(site.inputs)
            site.inputs.append(a.detach())

            def on_grad(g, call=call):
                if state["active"]:
                    site.on_grad(call, g, b, state["keep"], state["form"])
            return Tap.apply(out, anchor, on_grad)
        return hook
    handles = [s.module.register_forward_hook(make(s)) for s in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fallback_grads(loss_fn, leaves: dict[str, Tensor], names: list[str], chunk) -> dict[str, Tensor]:
    """Exact per-example gradients [b, *shape] of the `names` parameters (torch.func vmap(grad))."""
    const = {k: v.detach() for k, v in leaves.items() if k not in names}

    def one(p, *example):
        return loss_fn({**const, **p}, *(t[None] for t in example))[0]
    per_example = torch.func.vmap(torch.func.grad(one), in_dims=(None,) + (0,) * len(chunk), randomness="different")
    with torch.no_grad():
        return per_example({k: leaves[k].detach() for k in names}, *chunk)


def ghost_clipped_grad_sum(module: nn.Module, params: Mapping[str, Tensor], loss_fn: Callable[..., Tensor],
                           batch: tuple[Tensor, ...], max_grad_norm: float | None, microbatch_size: int,
                           clip_groups: Sequence[Sequence[str]] | None = None, *, sum_mode: str = "bookkeeping",
                           norm_form: str = "auto", rows_per_example: int | None = None
                           ) -> tuple[dict[str, Tensor], dict]:
    """Σ over the batch of per-example gradients, each (or each clip group) clipped; see the module doc.

    sum_mode: 'bookkeeping' or 'reweight' (a second backward; flat clipping only, else bookkeeping).
    norm_form: 'auto' (per layer, the smaller of ghost and materialised) or force one (tests).
    rows_per_example: K when known (privacy.noise_multiplicity): a layer is hooked only when it sees
    exactly b·K rows; without it, any multiple of b. The contract either way: a hooked layer's dim 0
    holds the examples' rows, example-major, as in diffusion_loss (a layer applied to something else,
    e.g. a fixed table of b·K rows, would be misattributed; the U-Nets here are tested).
    """
    n = _check_args(max_grad_norm, microbatch_size, batch, sum_mode, norm_form)
    plan = plan_sites(module, params)
    if plan.notice():
        warnings.warn(plan.notice(), GhostClippingNotice, stacklevel=2)
    names = list(params)
    group_of = dict(zip(names, clip_group_index(names, clip_groups)))
    n_groups = max(group_of.values(), default=0) + 1
    reweight = sum_mode == "reweight" and n_groups == 1
    group_clip = None if max_grad_norm is None else max_grad_norm / np.sqrt(n_groups)
    leaves = {k: v.detach() for k, v in params.items()}
    acc = {k: torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype for k, v in leaves.items()}
    grad_sum: dict[str, Tensor | None] = dict.fromkeys(leaves)      # set by the first contribution
    device = next(iter(leaves.values())).device if leaves else torch.device("cpu")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    norm_sum = torch.zeros((), dtype=torch.float64, device=device)
    clipped = torch.zeros((), dtype=torch.int64, device=device)
    state = {"active": True, "keep": not reweight, "form": norm_form, "rows": rows_per_example}
    mb = int(microbatch_size)
    for start in range(0, n, mb):
        chunk = tuple(t[start:start + mb] for t in batch)
        b = chunk[0].shape[0]
        for s in plan.sites:
            s.reset()
        hooked_leaves = {k: v.detach().requires_grad_(reweight and k not in plan.fallback) for k, v in leaves.items()}
        anchor = torch.zeros((), device=device, requires_grad=True)
        state["active"] = True
        with _tapped(plan.sites, b, anchor, state), torch.enable_grad():
            losses = loss_fn(hooked_leaves, *chunk)
        if losses.shape != (b,):
            raise DpldmError(f"ghost clipping: loss_fn must return one loss per example, shape ({b},); "
                             f"got {tuple(losses.shape)}")
        valid = [s for s in plan.sites if s.valid and s.inputs]
        # a layer never called (its weight may be used some other way) or called on rows that are not
        # the examples' rows: exact torch.func gradients for its parameters
        odd = [s for s in plan.sites if not (s.valid and s.inputs)]
        fb_names = list(plan.fallback) + [nm for s in odd for nm in s.roles.values()]
        if odd:
            warnings.warn(f"ghost clipping: layer {odd[0].name} ({len(odd)} in all) was not called, or called on rows "
                          "that are not a multiple of the examples; its parameters use the torch.func path",
                          GhostClippingNotice, stacklevel=2)
        if valid and losses.requires_grad:
            torch.autograd.grad(losses.sum(), [anchor], retain_graph=reweight, allow_unused=True)
        parts: list[list[Tensor]] = [[] for _ in range(n_groups)]          # squared norms [b] per group
        for s in valid:
            s.finish_norms()
            for role, nm in s.roles.items():
                if role in s.sq:
                    parts[group_of[nm]].append(s.sq[role].to(device, torch.float32))
        fb = _fallback_grads(loss_fn, leaves, fb_names, chunk) if fb_names else {}
        for nm, g in fb.items():
            parts[group_of[nm]].append(g.reshape(b, -1).float().pow(2).sum(1))
        sq = torch.stack([torch.stack(p).sum(0) if p else torch.zeros(b, device=device) for p in parts])
        group_norms = sq.sqrt()
        good = torch.isfinite(group_norms).all(0)
        all_good = bool(good.all())
        if group_clip is None:
            factor = torch.ones_like(group_norms)
            over = torch.zeros(b, dtype=torch.bool, device=device)
        else:
            factor = (group_clip / (group_norms + CLIP_EPS)).clamp(max=1.0)
            over = (group_norms > group_clip).any(0)
        factor = torch.where(good, factor, torch.zeros((), device=device))
        mask = None if all_good else good
        factors = factor.unbind(0)                                           # per group, [b]

        def add(nm: str, g: Tensor, owned: bool = True) -> None:
            # the first micro-batch's sum is kept as it is (a fresh result: `owned`), later ones added in
            g = g.reshape(leaves[nm].shape).to(acc[nm])
            if grad_sum[nm] is not None:
                grad_sum[nm].add_(g)
            else:
                grad_sum[nm] = g.contiguous() if owned else g.clone(memory_format=torch.contiguous_format)
        if reweight:
            state["active"] = False
            _reweighted_sum(loss_fn, hooked_leaves, losses, factors[0], good, all_good, chunk, valid, add)
        else:
            for s in valid:
                for role, nm in s.roles.items():
                    if role in s.sq:
                        add(nm, s.clipped_sum(role, factors[group_of[nm]], mask))
        for nm, g in fb.items():
            if mask is not None:
                g = torch.where(mask.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), dtype=g.dtype, device=device))
            add(nm, torch.einsum("b,b...->...", factors[group_of[nm]].to(acc[nm]), g.to(acc[nm])))
        for s in plan.sites:
            s.reset()
        lv = losses.detach().to(torch.float64)
        zero64 = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum += torch.where(good & torch.isfinite(lv), lv, zero64).sum()
        norms = sq.sum(0).to(torch.float64).sqrt()
        norm_sum += torch.where(good, norms, zero64).sum()
        clipped += (over | ~good).sum()
    stats = {"n": n, "loss_sum": float(loss_sum), "grad_norm_sum": float(norm_sum), "clipped": int(clipped)}
    return {k: torch.zeros_like(leaves[k], dtype=acc[k]) if g is None else g for k, g in grad_sum.items()}, stats


def _reweighted_sum(loss_fn, leaves, losses, factor, good, all_good, chunk, valid, add) -> None:
    """Ghost clipping's second backward: ∇ Σ_i f_i·loss_i for the hooked parameters (flat clipping).
    A micro-batch with a non-finite example recomputes its good examples only (NaN·0 is NaN)."""
    names = [nm for s in valid for role, nm in s.roles.items() if role in s.sq]
    if not names:
        return
    if not all_good:
        idx = good.nonzero().flatten()
        if len(idx) == 0:
            return
        losses = loss_fn(leaves, *(t[idx] for t in chunk))
        factor = factor[idx]
    grads = torch.autograd.grad((losses * factor.to(losses.dtype)).sum(), [leaves[nm] for nm in names],
                                allow_unused=True)
    for nm, g in zip(names, grads):
        if g is not None:
            add(nm, g, owned=False)                 # autograd's result may be an expanded view
