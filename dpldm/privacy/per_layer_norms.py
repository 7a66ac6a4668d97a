"""Per-example gradients of one layer from its input activation and output gradient (no vmap).

A trainable nn.Linear / nn.Conv2d / nn.GroupNorm / nn.LayerNorm (including the frozen-W layers of
LoDA/LoRA, whose A and B are themselves plain nn.Linear / nn.Conv2d) is a `Site`. The module is
called with N = b·K rows, example-major (diffusion_loss: an example's K noise draws are rows
i·K … i·K+K-1), so example i owns the K·T "tokens" t of those rows (T = positions per row: 1 for a
time-embedding Linear, H·W for a conv or an attention projection). With A_i [K·T, d_in] the layer's
input tokens (a conv's input unfolded to its receptive fields) and G_i [K·T, d_out] the gradient of
the summed loss with respect to the layer's output tokens, example i's weight gradient is
G_iᵀ A_i (the K draws summed, as one per-example gradient), and

    ghost form:        ‖G_iᵀ A_i‖²_F = Σ_{t,s} (A_i A_iᵀ)_{ts} (G_i G_iᵀ)_{ts}   ∝ (K·T)²·(d_in+d_out)
    materialised form: P_i = G_iᵀ A_i, ‖P_i‖² directly                            ∝ K·T·d_in·d_out

`Site.choose_form` takes the cheaper of the two (or a forced one). Biases and norm-layer affine
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
    def pointwise(self) -> bool:
        m = self.module
        return (self.kind == "conv" and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
                and tuple(m.padding) == (0, 0))

    def g_tokens(self, g: Tensor, b: int) -> Tensor:
        """G [b, K·T, d_out] in float32: the output gradient, an example's K rows' tokens together."""
        if self.kind == "conv":
            g = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)        # [N, L, out]
        return g.reshape(b, -1, g.shape[-1]).float()

    def a_tokens(self, a: Tensor, b: int) -> Tensor:
        """A [b, K·T, d_in] in float32 for a Linear or a 1×1 conv (k×k convs never build it)."""
        if self.kind == "conv":
            a = a.reshape(a.shape[0], a.shape[1], -1).transpose(1, 2)
        return a.reshape(b, -1, a.shape[-1]).float()

    def _offsets(self, a: Tensor, ho: int, wo: int):
        """For each kernel offset, the strided slice [N, C, ho, wo] of the padded input it multiplies."""
        m = self.module
        (ph, pw), (sh, sw), (dh, dw), (kh, kw) = m.padding, m.stride, m.dilation, m.kernel_size
        ap = F.pad(a.float(), (pw, pw, ph, ph)) if (ph or pw) else a.float()
        for i in range(kh):
            for j in range(kw):
                yield i, j, ap[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]

    def conv_per_example(self, a: Tensor, g: Tensor, b: int) -> Tensor:
        """Per-example weight gradients [b, out, in, kh, kw] of a k×k conv, one strided slice of the
        padded input per kernel offset (no im2col, which is slow on CPU)."""
        n, c = a.shape[0], a.shape[1]
        gf = g.reshape(n, g.shape[1], -1).float()                          # [N, out, L]
        out = torch.stack([torch.bmm(gf, x.reshape(n, c, -1).transpose(1, 2))
                           for _, _, x in self._offsets(a, g.shape[2], g.shape[3])], -1)
        out = out.reshape(n, g.shape[1], c, *self.module.kernel_size)
        return out.reshape(b, n // b, *out.shape[1:]).sum(1)

    def conv_gram(self, a: Tensor, nb: int, ho: int, wo: int) -> Tensor:
        """A_i A_iᵀ [nb, K·L, K·L] of a k×k conv's unfolded input, summed over kernel offsets."""
        n, c = a.shape[0], a.shape[1]
        gram = None
        for _, _, x in self._offsets(a, ho, wo):
            x = x.reshape(nb, n // nb, c, ho * wo).transpose(1, 2).reshape(nb, c, -1)   # [nb, C, K·L]
            term = torch.bmm(x.transpose(1, 2), x)
            gram = term if gram is None else gram.add_(term)
        return gram

    @staticmethod
    def choose_form(tokens: int, d_in: int, d_out: int, forced: str) -> str:
        """The cheaper form in multiply-adds per example: the Gram matrices cost (K·T)²·(d_in + d_out),
        the materialised gradient K·T·d_in·d_out; ties go to the ghost form (its batched products ran
        faster on CPU, and it keeps only the layer's input and output gradient, not b·d_in·d_out).
        Where the materialised form wins, its gradient (d_in·d_out) is smaller than twice the
        example's tokens (K·T·(d_in + d_out)). `forced` ('ghost' / 'materialise') overrides."""
        if forced in ("ghost", "materialise"):
            return forced
        return "ghost" if tokens * (d_in + d_out) < 2 * d_in * d_out else "materialise"   # 2: measured, CPU

    # -- backward tap ---------------------------------------------------------------------------
    def on_grad(self, call: int, g: Tensor, b: int, keep: bool, forced: str) -> None:
        """Per-example squared norms (and what the clipped sum needs) of one call's gradient; the
        call's input is released afterwards (a ghost-form weight keeps it in `stored`)."""
        if not self.valid:
            return
        try:
            self._on_grad(self.inputs[call], g.detach(), b, keep, forced)
        finally:
            self.inputs[call] = None

    def _on_grad(self, a: Tensor, g: Tensor, b: int, keep: bool, forced: str) -> None:
        if self.kind in ("groupnorm", "layernorm"):
            self._norm_layer(a, g, b, a.shape[0] // b)
            return
        G = self.g_tokens(g, b)
        if "bias" in self.roles:
            self._add_per_example("bias", G.sum(1))
        if "weight" not in self.roles:
            return
        w = self.module.weight
        form = self.form = self.choose_form(G.shape[1], w[0].numel(), w.shape[0], forced)
        if form == "materialise" or len(self.inputs) > 1:    # several calls: cross terms, so materialise
            if self.kind == "conv" and not self.pointwise():
                self._add_per_example("weight", self.conv_per_example(a, g, b))
            else:
                p = torch.bmm(G.transpose(1, 2), self.a_tokens(a, b))
                self._add_per_example("weight", p.reshape(b, *w.shape))
            return
        if self.kind == "conv" and not self.pointwise():
            k = a.shape[0] // b
            gram_a = lambda s, e: self.conv_gram(a[s * k:e * k], e - s, g.shape[2], g.shape[3])
        else:
            A = self.a_tokens(a, b)
            gram_a = lambda s, e: torch.bmm(A[s:e], A[s:e].transpose(1, 2))
        self.sq["weight"] = _ghost_sq(gram_a, G)
        if keep:
            self.stored.append((a, g))

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


def _ghost_sq(gram_a, G: Tensor) -> Tensor:
    """‖G_iᵀ A_i‖²_F = Σ (A_i A_iᵀ) ⊙ (G_i G_iᵀ) for every i, in example slices that bound the Gram
    memory; gram_a(s, e) gives A_i A_iᵀ for examples s..e-1."""
    b, t = G.shape[0], G.shape[1]
    step = max(1, _GRAM_BUDGET // max(1, t * t))
    out = []
    for s in range(0, b, step):
        g = G[s:s + step]
        out.append((gram_a(s, s + g.shape[0]) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)))
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
