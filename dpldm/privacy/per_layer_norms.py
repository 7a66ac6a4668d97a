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

`Site.choose_form` takes the cheaper of the two by a cost model fitted on CPU that also counts each
form's share of the clipped sum (or a forced one). Biases and norm-layer affine parameters
(per-example gradient Σ_t G_i, or Σ_t G_i ⊙ x̂_i) are always materialised: they are small.
The clipped sum Σ_i f_i·grad_i is then formed with the factors f (see ghost_clipping.py) either from
P (materialised) or from the stored raw input/output gradient with each example's rows scaled by f_i
(the ordinary weight-gradient kernel: "book-keeping"), so for a ghost-form weight nothing of size
b·d_in·d_out is built. A k×k conv never builds A_i either: its Gram and its per-example gradient come
from shifts along the flattened padded input (`conv_gram`, `conv_per_example`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpldm.models.loda import AdaptedLayer

_GRAM_BUDGET = 1 << 24          # elements of one (A Aᵀ, G Gᵀ) slice in the ghost form
_MATERIALISE_BUDGET = 1 << 21   # elements of a layer's per-example weight gradients (auto form)


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
    squared norms), `per_example` (role -> [b, ...] materialised gradients, in the parameter's layout
    or, for a role in `layout`, in one whose permutation by layout[role] is the parameter's) and
    `stored` (the raw (input, output-gradient) pair of a ghost-form weight, for the book-keeping sum).
    """
    name: str
    module: nn.Module
    kind: str
    roles: dict[str, str]
    form: str = "auto"                                   # 'ghost' | 'materialise' for the weight
    gram_way: str = "auto"                               # conv_gram: 'auto' | 'pixels' | 'offsets' (tests)
    inputs: list = field(default_factory=list)
    sq: dict = field(default_factory=dict)
    per_example: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    stored: list = field(default_factory=list)
    valid: bool = True

    def reset(self) -> None:
        self.inputs, self.sq, self.per_example, self.layout, self.stored, self.valid = [], {}, {}, {}, [], True

    # -- shapes ---------------------------------------------------------------------------------
    def pointwise(self) -> bool:
        m = self.module
        return (self.kind == "conv" and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
                and tuple(m.padding) == (0, 0))

    def rows(self, t: Tensor) -> Tensor:
        """One row's tokens as a matrix, float32, a view of `t` (no copy when it is float32 already):
        [N, d, T] channels first for a conv (its own layout), [N, T, d] tokens first for a Linear."""
        t = t.float()
        if self.kind == "conv":
            return t.reshape(t.shape[0], t.shape[1], -1)
        return t.reshape(t.shape[0], -1, t.shape[-1])

    def examples(self, m: Tensor, b: int) -> Tensor:
        """`rows` output regrouped per example, its K rows' tokens together: [b, d, K·T] (conv) or
        [b, K·T, d] (Linear). A view, except for a conv with K > 1 (one copy)."""
        k = m.shape[0] // b
        if k == 1:
            return m
        if self.kind == "conv":
            return m.reshape(b, k, m.shape[1], m.shape[2]).transpose(1, 2).reshape(b, m.shape[1], -1)
        return m.reshape(b, -1, m.shape[-1])

    def token_gram(self, m: Tensor) -> Tensor:
        """[n, T, T]: inner products between the tokens of each matrix from `rows` / `examples`."""
        return torch.bmm(m.transpose(1, 2), m) if self.kind == "conv" else torch.bmm(m, m.transpose(1, 2))

    def weight_product(self, a: Tensor, g: Tensor) -> tuple[Tensor, bool]:
        """Σ_t g_t a_tᵀ for each of the n matrices from `rows` / `examples`: [n, d_out, d_in], or its
        transpose [n, d_in, d_out] (and True) when d_out > d_in: BLAS writes a wide matrix several
        times faster than a tall, narrow one (measured: LoDA/LoRA's B, d_in = rank)."""
        conv = self.kind == "conv"
        d_out, d_in = (g.shape[1], a.shape[1]) if conv else (g.shape[2], a.shape[2])
        if d_out <= d_in:
            return (torch.bmm(g, a.transpose(1, 2)) if conv else torch.bmm(g.transpose(1, 2), a)), False
        return (torch.bmm(a, g.transpose(1, 2)) if conv else torch.bmm(a.transpose(1, 2), g)), True

    def _padded(self, a: Tensor) -> Tensor:
        ph, pw = self.module.padding
        return F.pad(a.float(), (pw, pw, ph, ph)) if (ph or pw) else a.float()

    def conv_per_example(self, a: Tensor, g: Tensor, b: int) -> tuple[Tensor, tuple[int, ...]]:
        """Per-example weight gradients of a k×k conv, summed over each example's K rows,
            P[o, c, i, j] = Σ_{y,x} g[o, y, x] · a_pad[c, y·sh + i·dh, x·sw + j·dw],
        as [b, out, kh, kw, in] when out ≤ in, else [b, in, out, kh, kw] (the wide products, as in
        `weight_product`), with the permutation of one example's to the weight's [out, in, kh, kw].
        With a_pad flattened row-major (width Wp) and g laid on the same grid (g[o, y, x] at position
        y·sh·Wp + x·sw, zeros elsewhere), kernel offset (i, j) is a shift by s = i·dh·Wp + j·dw along
        the flat input; so, without im2col:
          - out ≤ in: the kh·kw copies of the (small) gridded g, each shifted by its s, stacked into
            [out·kh·kw, Hp·Wp], times the flat input: one bmm;
          - out > in: per offset, gridded g times the window of the flat input that starts at s (a
            view): kh·kw bmm on views."""
        m = self.module
        (sh, sw), (dh, dw), (kh, kw) = m.stride, m.dilation, m.kernel_size
        n, c, o, ho, wo = a.shape[0], a.shape[1], g.shape[1], g.shape[2], g.shape[3]
        ap = self._padded(a)
        lp, wp = ap.shape[2] * ap.shape[3], ap.shape[3]
        x = ap.reshape(n, c, lp)                                               # [N, C, Hp·Wp]
        hq = (ho - 1) * sh + 1
        if sh == sw == 1:
            gq = F.pad(g.float(), (0, wp - wo))                                # [N, out, ho, Wp]
        else:
            gq = g.new_zeros((n, o, hq, wp), dtype=torch.float32)
            gq[:, :, ::sh, :(wo - 1) * sw + 1:sw] = g
        lq = (hq - 1) * wp + (wo - 1) * sw + 1                                 # up to g's last position
        gq = gq.reshape(n, o, -1)[:, :, :lq]
        shifts = [i * dh * wp + j * dw for i in range(kh) for j in range(kw)]
        if o <= c:
            gs = gq.new_zeros((n, o, kh * kw, lp))
            for i, s in enumerate(shifts):
                gs[:, :, i, s:s + lq] = gq
            out = torch.bmm(gs.view(n, -1, lp), x.transpose(1, 2)).view(n, o, kh, kw, c)
            layout = (0, 3, 1, 2)
        else:
            out = torch.stack([torch.bmm(x[:, :, s:s + lq], gq.transpose(1, 2)) for s in shifts], -1)
            out, layout = out.view(n, c, o, kh, kw), (1, 0, 2, 3)
        return (out if n == b else out.reshape(b, n // b, *out.shape[1:]).sum(1)), layout

    def conv_gram(self, a: Tensor, b: int, ho: int, wo: int) -> Tensor:
        """A_i A_iᵀ [b, K·L, K·L] of a k×k conv's unfolded input (L = ho·wo receptive fields per row,
        an example's K rows' together), without unfolding, the cheaper of two ways (`conv_gram_costs`):
          - "pixels": the Gram F = X_iᵀ X_i of the padded input's pixels (X_i [C, K·Hp·Wp]), computed
            on the input's own pixels (a view for K = 1) and zero-padded, since a padding pixel is zero
            in every channel. With pixels numbered row-major (p = y·Wp + x), the receptive field at
            grid position q covers pixels q + s for the kernel shifts s = i·dh·Wp + j·dw, so the fields
            at q and q' have the inner product Σ_s F[q + s, q' + s]: kh·kw diagonal shifts of F, each a
            slice whose rows are contiguous, added over the grid positions q < Lq (up to the last
            output's); the outputs are the grid positions y·sh·Wp + x·sw, picked by one strided view;
          - "offsets": per kernel offset, the strided slice of the padded input it multiplies (a copy) and
            its Gram, summed."""
        m = self.module
        (sh, sw), (dh, dw), (kh, kw), (ph, pw) = m.stride, m.dilation, m.kernel_size, m.padding
        n, c, h, w = a.shape
        k = n // b
        hp, wp = h + 2 * ph, w + 2 * pw
        pixels, offsets = self.conv_gram_costs(k, c, h, w, ho, wo)
        if self.gram_way == "pixels" or (self.gram_way == "auto" and pixels <= offsets):
            f = self.token_gram(self.examples(self.rows(a), b)).view(b, k, h, w, k, h, w)
            if ph or pw:
                f, f0 = f.new_zeros((b, k, hp, wp, k, hp, wp)), f
                f[:, :, ph:ph + h, pw:pw + w, :, ph:ph + h, pw:pw + w] = f0
            f = f.view(b, k, hp * wp, k, hp * wp)
            lq = (ho - 1) * sh * wp + (wo - 1) * sw + 1
            shifts = [i * dh * wp + j * dw for i in range(kh) for j in range(kw)]
            gram = f[:, :, :lq, :, :lq].clone(memory_format=torch.contiguous_format)     # shift 0
            for s in shifts[1:]:
                gram += f[:, :, s:s + lq, :, s:s + lq]
            st = gram.stride()                                          # [b, K, Lq, K, Lq], contiguous
            out = gram.as_strided((b, k, ho, wo, k, ho, wo),
                                  (st[0], st[1], sh * wp * st[2], sw * st[2], st[3], sh * wp, sw))
            return out.reshape(b, k * ho * wo, -1)
        ap = self._padded(a)
        ry = [slice(i * dh, i * dh + (ho - 1) * sh + 1, sh) for i in range(kh)]
        rx = [slice(j * dw, j * dw + (wo - 1) * sw + 1, sw) for j in range(kw)]
        gram = None
        for i in range(kh):
            for j in range(kw):
                x = self.examples(ap[:, :, ry[i], rx[j]].reshape(n, c, -1), b)   # [b, C, K·L]
                term = self.token_gram(x)
                gram = term if gram is None else gram.add_(term)
        return gram

    # Cost model, in multiply-add equivalents per example, fitted to 1-thread CPU timings of the layer
    # shapes of the quickstart and SD-layout U-Nets (bmm ≈ 0.04 ns per multiply-add): an element of a
    # shifted slice added costs ~6, one picked by the final strided view ~20, an element copied by a
    # kernel-offset slice ~50 (with its per-op overhead), an element of a materialised k×k conv
    # gradient ~60 (stacked, summed, squared).
    def conv_gram_costs(self, k: int, c: int, h: int, w: int, ho: int, wo: int) -> tuple[int, int]:
        """conv_gram's ("pixels", "offsets") costs for K rows of C channels, an h×w input, ho×wo outputs."""
        m = self.module
        kk = m.kernel_size[0] * m.kernel_size[1]
        hp, wp = h + 2 * m.padding[0], w + 2 * m.padding[1]
        lq = (ho - 1) * m.stride[0] * wp + (wo - 1) * m.stride[1] + 1
        lo = ho * wo
        return ((k * h * w) ** 2 * c + 2 * (k * hp * wp) ** 2 + 6 * kk * (k * lq) ** 2 + 20 * (k * lo) ** 2,
                kk * k * lo * c * (k * lo + 50))

    def costs(self, a: Tensor, g: Tensor, b: int) -> tuple[int, int]:
        """The weight's (ghost, materialised) forms' costs per example, each with its share of the
        clipped sum: the ghost form's is the book-keeping weight-gradient product (K·T·d_in·d_out; for
        a k×k conv with few outputs, conv2d_weight runs several times slower per multiply-add), the
        materialised form's a weighted sum of the per-example gradients it has anyway. For a Linear or
        1×1 conv, the materialised product (b·d_out·d_in to write) counts 2 per multiply-add: alone it
        ran at 1.5, in the whole step (its output evicting the caches) the ghost form won the ties; for
        the same reason a k×k conv's materialised form counts (32 + out)/32 times the model above (its
        buffers grow with out; fitted on the full fine-tuning step at K = 4)."""
        k = a.shape[0] // b
        if self.kind == "conv" and not self.pointwise():
            (ph, pw), (kh, kw) = self.module.padding, self.module.kernel_size
            c, o, ho, wo = a.shape[1], g.shape[1], g.shape[2], g.shape[3]
            hp, wp = a.shape[2] + 2 * ph, a.shape[3] + 2 * pw
            ghost = (min(self.conv_gram_costs(k, c, a.shape[2], a.shape[3], ho, wo)) + (k * ho * wo) ** 2 * o
                     + kh * kw * k * ho * wo * c * (o + 16))
            return ghost, kh * kw * c * o * (k * hp * wp + 60) * (32 + o) // 32
        w = self.module.weight
        d_out, d_in, t = w.shape[0], math.prod(w.shape[1:]), math.prod(g.shape[1:]) // w.shape[0]
        return k * k * t * t * (d_in + d_out) + k * t * d_in * d_out, 2 * k * t * d_in * d_out

    def choose_form(self, a: Tensor, g: Tensor, b: int, forced: str) -> str:
        """The cheaper form by `costs`, materialised only while the micro-batch's per-example gradients
        stay within _MATERIALISE_BUDGET elements (beyond the caches, writing them ran ten times slower
        than the model says, and they are memory the ghost form does not need); `forced` ('ghost' /
        'materialise') overrides."""
        if forced in ("ghost", "materialise"):
            return forced
        ghost, materialise = self.costs(a, g, b)
        small = b * self.module.weight.numel() <= _MATERIALISE_BUDGET
        return "materialise" if small and materialise < ghost else "ghost"

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
        g_rows = self.rows(g)
        if "bias" in self.roles:                             # Σ over the example's tokens (and K rows)
            bias = g_rows.sum(2 if self.kind == "conv" else 1)
            self._add_per_example("bias", bias if bias.shape[0] == b else bias.reshape(b, -1, bias.shape[1]).sum(1))
        if "weight" not in self.roles:
            return
        form = self.form = self.choose_form(a, g, b, forced)
        kxk = self.kind == "conv" and not self.pointwise()
        if form == "materialise" or len(self.inputs) > 1:    # several calls: cross terms, so materialise
            if kxk:
                self._add_per_example("weight", *self.conv_per_example(a, g, b))
                return
            a_rows = self.rows(a)
            if self.kind == "conv" and a.shape[0] != b:      # per row, then the K rows summed (no copy)
                p, t = self.weight_product(a_rows, g_rows)
                p = p.reshape(b, -1, *p.shape[1:]).sum(1)
            else:
                p, t = self.weight_product(self.examples(a_rows, b), self.examples(g_rows, b))
            self._add_per_example("weight", p, (1, 0) if t else None)
            return
        G = self.examples(g_rows, b)
        gram_g = lambda s, e: self.token_gram(G[s:e])
        tokens = G.shape[2] if self.kind == "conv" else G.shape[1]          # K·T
        if kxk:
            k = a.shape[0] // b
            gram_a = lambda s, e: self.conv_gram(a[s * k:e * k], e - s, g.shape[2], g.shape[3])
            ph, pw = self.module.padding
            tokens = max(tokens, k * (a.shape[2] + 2 * ph) * (a.shape[3] + 2 * pw))   # conv_gram's pixel Gram
        else:
            A = self.examples(self.rows(a), b)
            gram_a = lambda s, e: self.token_gram(A[s:e])
        self.sq["weight"] = _ghost_sq(gram_a, gram_g, b, tokens * tokens)
        if keep:
            self.stored.append((a, g))

    def _add_per_example(self, role: str, p: Tensor, layout: tuple[int, ...] | None = None) -> None:
        prev = self.per_example.get(role)
        self.per_example[role] = p if prev is None else prev + p
        if layout is not None:
            self.layout[role] = layout

    def _norm_layer(self, x: Tensor, g: Tensor, b: int, k: int) -> None:
        """Per-example gradients of a norm layer's affine parameters: Σ over the example's rows and
        positions of g ⊙ x̂ (weight) and of g (bias), x̂ the normalised input (recomputed)."""
        m = self.module
        if self.kind == "groupnorm":
            xhat = F.group_norm(x.float(), m.num_groups, eps=m.eps)
            reduce = lambda t: t.reshape(b, k, t.shape[1], -1).sum((1, 3))            # [b, C]
        else:
            shape = tuple(m.normalized_shape)
            xhat = F.layer_norm(x.float(), shape, eps=m.eps)
            reduce = lambda t: t.reshape(b, -1, *shape).sum(1)                         # [b, *shape]
        g = g.float()
        if "weight" in self.roles:
            self._add_per_example("weight", reduce(xhat.mul_(g)))
        if "bias" in self.roles:
            self._add_per_example("bias", reduce(g))

    def finish_norms(self) -> None:
        """Squared norms of the materialised per-example gradients (after all calls' backward)."""
        for role, p in self.per_example.items():
            self.sq[role] = p.reshape(p.shape[0], -1).pow(2).sum(1)

    # -- clipped sum ----------------------------------------------------------------------------
    def clipped_sum(self, role: str, factor: Tensor, good: Tensor | None) -> Tensor:
        """Σ_i factor_i · grad_i for one parameter (to be reshaped like it); examples with good_i False
        contribute zero."""
        p = self.per_example.get(role)
        if p is not None:
            if good is not None:
                p = torch.where(good.view(-1, *([1] * (p.dim() - 1))), p, torch.zeros((), dtype=p.dtype,
                                                                                       device=p.device))
            s = (factor.to(p.dtype) @ p.reshape(p.shape[0], -1)).view(p.shape[1:])
            return s.permute(self.layout[role]).contiguous() if role in self.layout else s
        (a, g), = self.stored                              # ghost form: one call, book-keeping
        b = factor.shape[0]
        k = a.shape[0] // b
        if good is not None:
            rows_ok = good.repeat_interleave(k)
            a = torch.where(rows_ok.view(-1, *([1] * (a.dim() - 1))), a, torch.zeros((), dtype=a.dtype,
                                                                                     device=a.device))
            g = torch.where(rows_ok.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), dtype=g.dtype,
                                                                                     device=g.device))
        # the weight gradient is bilinear in (input, output gradient): scale the smaller one's rows by f
        row_f = (factor if k == 1 else factor.repeat_interleave(k)).to(torch.float32)
        scaled = lambda t: t.float() * row_f.view(-1, *([1] * (t.dim() - 1)))
        a, g = (scaled(a), g.float()) if a.numel() < g.numel() else (a.float(), scaled(g))
        m = self.module
        if self.kind == "conv":
            return torch.nn.grad.conv2d_weight(a, m.weight.shape, g, stride=m.stride, padding=m.padding,
                                               dilation=m.dilation, groups=1)
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        return g.t() @ a if g.shape[1] <= a.shape[1] else (a.t() @ g).t().contiguous()   # the wide product


def _ghost_sq(gram_a, gram_g, b: int, elems: int) -> Tensor:
    """‖G_iᵀ A_i‖²_F = Σ (A_i A_iᵀ) ⊙ (G_i G_iᵀ) for every i, in example slices that bound the Gram
    memory (`elems` per example); gram_a(s, e) / gram_g(s, e) give the Grams of examples s..e-1."""
    step = max(1, _GRAM_BUDGET // max(1, elems))
    parts = [gram_a(s, min(s + step, b)).mul_(gram_g(s, min(s + step, b))).sum((1, 2)) for s in range(0, b, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to a callback.

    The `anchor` (a scalar leaf) makes every tapped output reachable by one
    `torch.autograd.grad(loss, anchor, allow_unused=True)`, which computes no parameter gradient at
    all (nor one for the anchor: the tap returns None for it, which autograd reads as zero).
    """

    @staticmethod
    def forward(ctx, out: Tensor, anchor: Tensor, callback) -> Tensor:
        ctx.callback = callback
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.callback(grad)
        return grad, None, None
