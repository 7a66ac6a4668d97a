"""Per-example gradients of one layer from its input activation and output gradient (no vmap).

A trainable nn.Linear / nn.Conv2d / nn.GroupNorm / nn.LayerNorm (including the frozen-W layers of
LoDA/LoRA, whose A and B are themselves plain nn.Linear / nn.Conv2d) is a `Site`. The module is
called with N = b·K rows, example-major (diffusion_loss: an example's K noise draws are rows
i·K … i·K+K-1), so example i owns the K·T "tokens" t of those rows (T = positions per row: 1 for a
time-embedding Linear, H·W for a conv or an attention projection). With A_i [K·T, d_in] the layer's
input tokens (a conv's input unfolded to its receptive fields) and G_i [K·T, d_out] the gradient of
the summed loss with respect to the layer's output tokens, example i's weight gradient is
G_iᵀ A_i (the K draws summed, as one per-example gradient), and

    ghost form:        ‖G_iᵀ A_i‖²_F = Σ_{t,s} (A_i A_iᵀ)_{ts} (G_i G_iᵀ)_{ts}     memory ∝ (K·T)²
    materialised form: P_i = G_iᵀ A_i, ‖P_i‖² directly                              memory ∝ d_in·d_out

`Site.choose_form` takes the smaller of the two (or a forced one). Biases and norm-layer affine
parameters (per-example gradient Σ_t G_i, or Σ_t G_i ⊙ x̂_i) are always materialised: they are small.
The clipped sum Σ_i f_i·grad_i is then formed with the factors f (see ghost_clipping.py) either from
P (materialised) or from the stored raw input/output gradient with each example's rows scaled by f_i
(the ordinary weight-gradient kernel: "book-keeping"), so nothing of size b·d_in·d_out is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpldm.models.loda import AdaptedLayer

_GRAM_BUDGET = 1 << 24          # elements of one (A Aᵀ, G Gᵀ) slice in the ghost form


def site_kind(module: nn.Module) -> str | None:
    """'linear', 'conv', 'groupnorm' or 'layernorm' when per_layer_norms handles this module's own
    parameters exactly, else None (the engine then uses torch.func for them)."""
    plain_or_adapted = type(module) in (nn.Linear, nn.Conv2d) or isinstance(module, AdaptedLayer)
    if isinstance(module, nn.Linear) and plain_or_adapted:
        return "linear"
    if isinstance(module, nn.Conv2d) and plain_or_adapted:
        if module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return "conv"
        return None
    if type(module) is nn.GroupNorm and module.affine:
        return "groupnorm"
    if type(module) is nn.LayerNorm and module.elementwise_affine:
        return "layernorm"
    return None


def why_unsupported(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d) and site_kind(module) is None:
        return f"{type(module).__name__} with groups/padding_mode/string padding"
    return type(module).__name__


@dataclass
class Site:
    """One layer whose trainable parameters get exact per-example gradients from hooks.

    roles: parameter role ('weight'/'bias') -> the trainable parameter's name in `params`.
    Per micro-batch: `inputs` holds each call's input; the backward tap fills `sq` (role -> [b]
    squared norms), `per_example` (role -> [b, *shape] materialised gradients) and `stored`
    (the raw (input, output-gradient) pairs of a ghost-form weight, for the book-keeping sum).
    """
    name: str
    module: nn.Module
    kind: str
    roles: dict[str, str]
    form: str = "auto"                                   # 'ghost' | 'materialise' for the weight
    inputs: list = field(default_factory=list)
    sq: dict = field(default_factory=dict)
    per_example: dict = field(default_factory=dict)
    stored: list = field(default_factory=list)
    valid: bool = True

    def reset(self) -> None:
        self.inputs, self.sq, self.per_example, self.stored, self.valid = [], {}, {}, [], True

    # -- shapes ---------------------------------------------------------------------------------
    def tokens(self, a: Tensor, g: Tensor, b: int) -> tuple[Tensor, Tensor]:
        """(A [b, K·T, d_in], G [b, K·T, d_out]) in float32 for a linear/conv site."""
        m, n = self.module, a.shape[0]
        if self.kind == "conv":
            a = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = a.transpose(1, 2)                                          # [N, L, C·kh·kw]
            g = g.reshape(n, g.shape[1], -1).transpose(1, 2)               # [N, L, out]
        return (a.reshape(b, -1, a.shape[-1]).float(), g.reshape(b, -1, g.shape[-1]).float())

    def choose_form(self, tokens: int, d_in: int, d_out: int, forced: str) -> str:
        if forced in ("ghost", "materialise"):
            return forced
        return "ghost" if tokens * tokens < d_in * d_out else "materialise"

    # -- backward tap ---------------------------------------------------------------------------
    def on_grad(self, call: int, g: Tensor, b: int, keep: bool, forced: str) -> None:
        """Per-example squared norms (and what the clipped sum needs) of one call's gradient."""
        if not self.valid:
            return
        a = self.inputs[call]
        n = a.shape[0]
        if self.kind in ("groupnorm", "layernorm"):
            self._norm_layer(a, g.detach(), b, n // b)
            return
        A, G = self.tokens(a, g.detach(), b)
        if "bias" in self.roles:
            self._add_per_example("bias", G.sum(1))
        if "weight" not in self.roles:
            return
        w = self.module.weight
        form = self.form = self.choose_form(A.shape[1], A.shape[2], G.shape[2], forced)
        if form == "materialise" or len(self.inputs) > 1:    # several calls: cross terms, so materialise
            self._add_per_example("weight", torch.bmm(G.transpose(1, 2), A).reshape(b, *w.shape))
            return
        self.sq["weight"] = _ghost_sq(A, G)
        if keep:
            self.stored.append((a, g.detach()))

    def _add_per_example(self, role: str, p: Tensor) -> None:
        prev = self.per_example.get(role)
        self.per_example[role] = p if prev is None else prev + p

    def _norm_layer(self, x: Tensor, g: Tensor, b: int, k: int) -> None:
        m = self.module
        if self.kind == "groupnorm":
            xhat = F.group_norm(x.float(), m.num_groups, eps=m.eps)
            reduce = lambda t: t.reshape(t.shape[0], t.shape[1], -1).sum(-1)            # [N, C]
        else:
            shape = tuple(m.normalized_shape)
            xhat = F.layer_norm(x.float(), shape, eps=m.eps)
            reduce = lambda t: t.reshape(t.shape[0], -1, *shape).sum(1)               # [N, *shape]
        g = g.float()
        if "weight" in self.roles:
            self._add_per_example("weight", reduce(g * xhat).reshape(b, k, *m.weight.shape).sum(1))
        if "bias" in self.roles:
            self._add_per_example("bias", reduce(g).reshape(b, k, *m.bias.shape).sum(1))

    def finish_norms(self) -> None:
        """Squared norms of the materialised per-example gradients (after all calls' backward)."""
        for role, p in self.per_example.items():
            self.sq[role] = p.reshape(p.shape[0], -1).pow(2).sum(1)

    # -- clipped sum ----------------------------------------------------------------------------
    def clipped_sum(self, role: str, factor: Tensor, good: Tensor | None) -> Tensor:
        """Σ_i factor_i · grad_i for one parameter; examples with good_i False contribute zero."""
        p = self.per_example.get(role)
        if p is not None:
            if good is not None:
                p = torch.where(good.view(-1, *([1] * (p.dim() - 1))), p, torch.zeros((), dtype=p.dtype,
                                                                                       device=p.device))
            return torch.einsum("b,b...->...", factor.to(p.dtype), p)
        (a, g), = self.stored                              # ghost form: one call, book-keeping
        b = factor.shape[0]
        k = a.shape[0] // b
        row_f = factor.repeat_interleave(k).to(torch.float32)
        if good is not None:
            rows_ok = good.repeat_interleave(k)
            a = torch.where(rows_ok.view(-1, *([1] * (a.dim() - 1))), a, torch.zeros((), dtype=a.dtype,
                                                                                     device=a.device))
            g = torch.where(rows_ok.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), dtype=g.dtype,
                                                                                     device=g.device))
        gs = g.float() * row_f.view(-1, *([1] * (g.dim() - 1)))
        m = self.module
        if self.kind == "conv":
            return torch.nn.grad.conv2d_weight(a.float(), m.weight.shape, gs, stride=m.stride, padding=m.padding,
                                               dilation=m.dilation, groups=1)
        return gs.reshape(-1, gs.shape[-1]).t() @ a.reshape(-1, a.shape[-1]).float()


def _ghost_sq(A: Tensor, G: Tensor) -> Tensor:
    """‖G_iᵀ A_i‖²_F for every i without forming G_iᵀ A_i, in slices that bound the Gram memory."""
    b, t = A.shape[0], A.shape[1]
    step = max(1, _GRAM_BUDGET // max(1, t * t))
    out = []
    for s in range(0, b, step):
        a, g = A[s:s + step], G[s:s + step]
        out.append((torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)))
    return torch.cat(out)


class Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to a callback.

    The `anchor` (a scalar leaf) makes every tapped output reachable by one
    `torch.autograd.grad(loss, anchor)`, which computes no parameter gradient at all.
    """

    @staticmethod
    def forward(ctx, out: Tensor, anchor: Tensor, callback) -> Tensor:
        ctx.callback, ctx.anchor_dtype = callback, anchor.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.callback(grad)
        return grad, torch.zeros((), dtype=ctx.anchor_dtype, device=grad.device), None
