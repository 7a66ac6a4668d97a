"""Low-dimensional adapters (LoDA) beside frozen nn.Conv2d / nn.Linear layers.

    y = W(x) + scale · B(σ(A(x)))

A maps to `rank` channels with W's own kernel/stride/padding/dilation (groups=1), σ is a
nonlinearity (DP-LoDA: LeakyReLU(0.1)), B is a 1×1 conv (or linear) back to W's outputs and
starts at zero, so the adapted layer equals the pretrained one at initialisation.

An adapted layer *is* its base class (LoDAConv2d subclasses nn.Conv2d) and keeps W's parameters
at their original paths (`...to_q.weight`, `...to_q.bias`); the adapter adds `...to_q.loda_A.weight`
and `...to_q.loda_B.weight`. So the U-Net's state dict stays a superset of the pretrained one and
diffusers code that inspects `attn.to_q.weight` keeps working. LoRA (lora.py) is the special
case σ = identity with `lora_A` / `lora_B` names, which is also diffusers' LoRA key layout.

Forward passes use no in-place ops and no data-dependent control flow, so they run under
torch.func.functional_call + vmap(grad) for per-example gradients.

This module imports torch only (no dpldm module): `dpldm export` ships it beside adapted_unet.py inside
an exported LoDA pipeline so plain diffusers loads it (docs/adapters.md). Its errors are ValueErrors for
misuse; user-facing checks (DpldmError) happen in adapters.py before these classes are reached.
"""
from __future__ import annotations

import torch
from torch import nn

NONLINEARITIES = {
    "leaky_relu": lambda: nn.LeakyReLU(0.1),   # the DP-LoDA paper's choice
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_nonlinearity(name: str) -> nn.Module:
    if name not in NONLINEARITIES:
        raise ValueError(f"adapter.nonlinearity must be one of {', '.join(NONLINEARITIES)}; got {name!r}")
    return NONLINEARITIES[name]()


class AdaptedLayer:
    """Mixin for a frozen base layer (the class it is mixed into) plus a trainable A/B adapter."""

    prefix = "loda"   # submodule names: f"{prefix}_A", f"{prefix}_B"

    def _attach(self, rank: int, nonlinearity: str, scale: float) -> None:
        a, b = self._make_a(rank), self._make_b(rank)
        nn.init.zeros_(b.weight)             # adapted == pretrained at init
        setattr(self, f"{self.prefix}_A", a)
        setattr(self, f"{self.prefix}_B", b)
        self.adapter_act = make_nonlinearity(nonlinearity)
        self.rank, self.nonlinearity, self.scale = rank, nonlinearity, float(scale)

    @property
    def adapter_a(self) -> nn.Module:
        return getattr(self, f"{self.prefix}_A")

    @property
    def adapter_b(self) -> nn.Module:
        return getattr(self, f"{self.prefix}_B")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        return base + self.scale * self.adapter_b(self.adapter_act(self.adapter_a(x)))

    # -- merging (only when the adapter is linear) --------------------------------------------
    @property
    def mergeable(self) -> bool:
        return self.nonlinearity == "identity"

    def delta_weight(self) -> torch.Tensor:
        """scale · B∘A as a tensor shaped like W (exact because B is 1×1 and σ is identity)."""
        if not self.mergeable:
            raise ValueError(f"a LoDA adapter with nonlinearity '{self.nonlinearity}' is not linear and "
                             "cannot be merged into the base weight")
        a, b = self.adapter_a.weight, self.adapter_b.weight
        if a.dim() == 2:                                   # linear: (out, r) @ (r, in)
            return self.scale * (b @ a)
        return self.scale * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)   # conv: B 1×1 ∘ A k×k

    def merged(self) -> nn.Module:
        """A plain nn.Conv2d / nn.Linear with W + scale·B∘A (and W's bias)."""
        plain = self._plain_like()
        with torch.no_grad():
            plain.weight = nn.Parameter(self.weight.detach() + self.delta_weight().to(self.weight.dtype),
                                        requires_grad=False)
            if self.bias is not None:
                plain.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", {self.prefix}: rank={self.rank}, "
                f"nonlinearity={self.nonlinearity}, scale={self.scale:g}")


class LoDAConv2d(AdaptedLayer, nn.Conv2d):
    """nn.Conv2d W (frozen, same parameter paths) + scale·B(σ(A(x))), A k×k with W's geometry, B 1×1."""

    @classmethod
    def from_base(cls, base: nn.Conv2d, rank: int, nonlinearity: str = "leaky_relu",
                  scale: float = 1.0) -> "LoDAConv2d":
        new = cls(base.in_channels, base.out_channels, base.kernel_size, stride=base.stride,
                  padding=base.padding, dilation=base.dilation, groups=base.groups,
                  bias=base.bias is not None, padding_mode=base.padding_mode, device="meta")
        new.weight, new.bias = base.weight, base.bias       # share W; nothing is copied
        new.train(base.training)
        new._attach(rank, nonlinearity, scale)
        return new

    def _factory(self) -> dict:
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    def _make_a(self, rank: int) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, rank, self.kernel_size, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, bias=False, padding_mode=self.padding_mode, **self._factory())

    def _make_b(self, rank: int) -> nn.Conv2d:
        return nn.Conv2d(rank, self.out_channels, 1, bias=False, **self._factory())

    def _plain_like(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")


class LoDALinear(AdaptedLayer, nn.Linear):
    """nn.Linear W (frozen, same parameter paths) + scale·B(σ(A(x))), A: in→r, B: r→out."""

    @classmethod
    def from_base(cls, base: nn.Linear, rank: int, nonlinearity: str = "leaky_relu",
                  scale: float = 1.0) -> "LoDALinear":
        new = cls(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        new.weight, new.bias = base.weight, base.bias
        new.train(base.training)
        new._attach(rank, nonlinearity, scale)
        return new

    def _factory(self) -> dict:
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    def _make_a(self, rank: int) -> nn.Linear:
        return nn.Linear(self.in_features, rank, bias=False, **self._factory())

    def _make_b(self, rank: int) -> nn.Linear:
        return nn.Linear(rank, self.out_features, bias=False, **self._factory())

    def _plain_like(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")


def wrap_loda(base: nn.Module, rank: int, nonlinearity: str, scale: float) -> AdaptedLayer:
    """The LoDA-adapted version of a plain nn.Conv2d / nn.Linear (sharing its parameters)."""
    if isinstance(base, nn.Conv2d):
        return LoDAConv2d.from_base(base, rank, nonlinearity, scale)
    if isinstance(base, nn.Linear):
        return LoDALinear.from_base(base, rank, nonlinearity, scale)
    raise ValueError(f"LoDA adapts nn.Conv2d and nn.Linear layers only; got {type(base).__name__}")
