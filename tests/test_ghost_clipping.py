"""The ghost-norm / book-keeping clipping engine equals the torch.func one (dp_step.clipped_grad_sum) on
the same draws: every adapter kind, the default U-Net (ModelConfig()) and a small SD-layout U-Net, K > 1, clip
groups, micro-batches, both norm forms, both sum modes, a non-finite example, and the fallback."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn
from torch.func import functional_call

from dpldm.config import AdapterConfig, ModelConfig
from dpldm.errors import DpldmError
from dpldm.models.adapters import attach_adapter, trainable_named_parameters
from dpldm.models.diffusion_loss import diffusion_loss
from dpldm.models.pipeline import build_scheduler, build_unet
from dpldm.privacy.dp_step import clipped_grad_sum
from dpldm.privacy.ghost_clipping import (GhostClippingNotice, choose_engine, ghost_clipped_grad_sum, plan_sites,
                                          supports)
from dpldm.privacy.per_layer_norms import Site

KINDS = ["loda", "lora", "attention", "full"]
ALPHAS = build_scheduler(ModelConfig()).alphas_cumprod


def default_unet() -> nn.Module:
    torch.manual_seed(0)
    return build_unet(ModelConfig(), cross_attention_dim=384, latent_size=8)      # channels [64, 128]


def sd_layout_unet() -> nn.Module:
    """SD-1.5's block layout (3 cross-attention levels + 1 plain, 2 layers per block) at toy width."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=24, norm_num_groups=8, attention_head_dim=8)


MODELS = {"default": (default_unet, 384), "sd_layout": (sd_layout_unet, 24)}


def adapted(model: str, kind: str):
    build, cond_dim = MODELS[model]
    unet = build()
    attach_adapter(unet, AdapterConfig(kind=kind, rank=2))
    params = trainable_named_parameters(unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                      # move zero-initialised B so every gradient is generic
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return unet, params, cond_dim


def draws(n: int, k: int, cond_dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 5, cond_dim, generator=g),
            torch.randint(0, 1000, (n, k), generator=g), torch.randn(n, k, 4, 8, 8, generator=g))


def loss_fns(unet):
    """(batched functional loss for the ghost engine, one-example loss for torch.func)."""
    def batch_loss(p, x0, cond, t, noise):
        def call(x_t, tt, c):
            return functional_call(unet, p, (x_t, tt), {"encoder_hidden_states": c, "return_dict": False})[0]
        return diffusion_loss(call, ALPHAS, x0, cond, t, noise)

    def one(p, x0, cond, t, noise):
        return batch_loss(p, x0[None], cond[None], t[None], noise[None])[0]
    return batch_loss, one


def rel_err(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    num = math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b))
    return num / math.sqrt(sum((b[k].double() ** 2).sum().item() for k in b))


def assert_same(got, ref, tol: float = 2e-5):
    (g, gs), (r, rs) = got, ref
    assert rel_err(g, r) < tol
    scale = max(v.abs().max().item() for v in r.values())
    for k in r:                                 # every parameter, not just the total
        assert torch.allclose(g[k], r[k], rtol=1e-3, atol=1e-5 * scale), k
    assert gs["n"] == rs["n"] and gs["clipped"] == rs["clipped"]
    assert gs["loss_sum"] == pytest.approx(rs["loss_sum"], rel=1e-5)
    assert gs["grad_norm_sum"] == pytest.approx(rs["grad_norm_sum"], rel=1e-4)


def typical_clip(unet, params, batch_loss, batch) -> float:
    """The mean per-example norm: clips some examples and not others."""
    _, st = ghost_clipped_grad_sum(unet, params, batch_loss, batch, None, len(batch[0]))
    return st["grad_norm_sum"] / st["n"]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_func_for_every_adapter_kind(model, kind):
    unet, params, cond_dim = adapted(model, kind)
    batch_loss, one = loss_fns(unet)
    batch = draws(5, 2, cond_dim)                           # K = 2 rows per example
    clip = typical_clip(unet, params, batch_loss, batch)
    ref = clipped_grad_sum(one, params, batch, clip, 5)
    assert 0 < ref[1]["clipped"] < 5                        # both branches of the clip factor are used
    with warnings.catch_warnings():
        warnings.simplefilter("error", GhostClippingNotice)                  # no torch.func fallback at all
        got = ghost_clipped_grad_sum(unet, params, batch_loss, batch, clip, 3,     # micro-batches 3 + 2
                                     rows_per_example=2)
    assert_same(got, ref)
    assert not plan_sites(unet, params).fallback and supports(unet, params)
    sums = got[0].values()                                  # owned, contiguous tensors (all-reduced in place)
    assert all(v.is_contiguous() for v in sums) and len({v.data_ptr() for v in sums}) == len(sums)


@pytest.mark.parametrize("model,kind", [("default", "loda"), ("default", "attention"), ("sd_layout", "full"),
                                        ("sd_layout", "lora")])
def test_clip_groups_match_torch_func(model, kind):
    unet, params, cond_dim = adapted(model, kind)
    batch_loss, one = loss_fns(unet)
    batch = draws(4, 3, cond_dim, seed=2)
    names = list(params)
    cross = [n for n in names if ".attn2." in n]
    biases = [n for n in names if n.endswith(".bias") and n not in cross]     # a layer's weight and bias apart
    groups = [g for g in (cross, biases, [n for n in names if n not in cross and n not in biases]) if g]
    assert len(groups) >= 2
    clip = typical_clip(unet, params, batch_loss, batch)
    ref = clipped_grad_sum(one, params, batch, clip, 4, clip_groups=groups)
    assert ref[1]["clipped"] > 0
    assert_same(ghost_clipped_grad_sum(unet, params, batch_loss, batch, clip, 2, clip_groups=groups), ref)
    assert_same(ghost_clipped_grad_sum(unet, params, batch_loss, batch, clip, 4, clip_groups=groups,
                                       sum_mode="reweight"), ref)            # groups: book-keeping is used


@pytest.mark.parametrize("form", ["ghost", "materialise"])
@pytest.mark.parametrize("sum_mode", ["bookkeeping", "reweight"])
def test_both_norm_forms_and_sum_modes_on_every_layer_type(form, sum_mode):
    """Full fine-tuning of the SD-layout U-Net has every supported layer: 3×3 convs (stride 1 and 2),
    1×1 convs, Linear on tokens and on time embeddings, GroupNorm, LayerNorm."""
    unet, params, cond_dim = adapted("sd_layout", "full")
    batch_loss, one = loss_fns(unet)
    batch = draws(3, 2, cond_dim, seed=4)
    clip = typical_clip(unet, params, batch_loss, batch)
    ref = clipped_grad_sum(one, params, batch, clip, 3)
    assert_same(ghost_clipped_grad_sum(unet, params, batch_loss, batch, clip, 2, norm_form=form,
                                       sum_mode=sum_mode), ref)


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1, stride=2),
                                      dict(kernel_size=(3, 2), padding=(2, 0), stride=(1, 2), dilation=(2, 1)),
                                      dict(kernel_size=2)])
@pytest.mark.parametrize("c,o", [(5, 3), (3, 6)])                  # out < in and out > in (the wide product)
def test_conv_per_example_gradient_and_gram_match_unfold(geometry, c, o):
    """The k×k conv paths against im2col (F.unfold): the per-example gradient by both ways (shifted
    copies of the output gradient, shifted windows of the flat padded input), the unfolded input's Gram
    by both ways (diagonal shifts of the pixel Gram, per-offset slices), and the squared norms of both
    forms; K = 2 rows per example, a non-square input."""
    b, k = 3, 2
    torch.manual_seed(0)
    conv = nn.Conv2d(c, o, bias=False, **geometry)
    a = torch.randn(b * k, c, 7, 6)
    g = torch.randn(conv(a).shape)
    (kh, kw), n_out = conv.kernel_size, g.shape[2] * g.shape[3]
    u = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    u = u.reshape(b, k, c * kh * kw, n_out).transpose(1, 2).reshape(b, c * kh * kw, k * n_out)    # an example's rows
    gt = g.reshape(b, k, o, n_out).transpose(1, 2).reshape(b, o, k * n_out)
    ref = (gt @ u.transpose(1, 2)).reshape(b, o, c, kh, kw)
    site = Site("conv", conv, "conv", {"weight": "conv.weight"})
    p, layout = site.conv_per_example(a, g, b)                  # two ways, by out ≤ in
    assert layout == ((1, 0, 2, 3) if o > c else (0, 3, 1, 2))
    assert torch.allclose(p.permute(0, *(d + 1 for d in layout)), ref, atol=1e-4)
    for way in ("pixels", "offsets"):
        site.gram_way = way
        assert torch.allclose(site.conv_gram(a, b, g.shape[2], g.shape[3]), u.transpose(1, 2) @ u, atol=1e-3)
        for form in ("ghost", "materialise"):
            site.reset()
            site.inputs = [a]
            site.on_grad(0, g, b, False, form)
            site.finish_norms()
            assert torch.allclose(site.sq["weight"], ref.flatten(1).pow(2).sum(1), rtol=1e-4), (way, form)


def test_k_rows_form_one_per_example_gradient():
    """Negative control: clipping each of an example's K rows on its own (K=1 with B·K examples) is
    a different sum, and the engine does not produce it."""
    unet, params, cond_dim = adapted("default", "lora")
    batch_loss, one = loss_fns(unet)
    x0, cond, t, noise = draws(3, 2, cond_dim, seed=5)
    clip = typical_clip(unet, params, batch_loss, (x0, cond, t, noise)) / 4
    got, _ = ghost_clipped_grad_sum(unet, params, batch_loss, (x0, cond, t, noise), clip, 3)
    rows = (x0.repeat_interleave(2, 0), cond.repeat_interleave(2, 0), t.reshape(6, 1), noise.reshape(6, 1, 4, 8, 8))
    per_row, _ = clipped_grad_sum(one, params, rows, clip, 6)
    assert rel_err(got, per_row) > 1e-2
    assert rel_err(got, clipped_grad_sum(one, params, (x0, cond, t, noise), clip, 3)[0]) < 2e-5


@pytest.mark.parametrize("sum_mode", ["bookkeeping", "reweight"])
def test_a_non_finite_example_contributes_zero(sum_mode):
    unet, params, cond_dim = adapted("default", "loda")
    batch_loss, one = loss_fns(unet)
    batch = draws(5, 2, cond_dim, seed=6)
    batch[0][2, 0, 0, 0] = float("inf")                     # example 2's gradient is NaN
    keep = torch.tensor([0, 1, 3, 4])
    clip = typical_clip(unet, params, batch_loss, tuple(t[keep] for t in batch))
    ref, rs = clipped_grad_sum(one, params, tuple(t[keep] for t in batch), clip, 4)
    got, gs = ghost_clipped_grad_sum(unet, params, batch_loss, batch, clip, 3, sum_mode=sum_mode)
    assert all(torch.isfinite(v).all() for v in got.values())
    assert rel_err(got, ref) < 2e-5
    assert gs["n"] == 5 and gs["clipped"] == rs["clipped"] + 1
    assert math.isfinite(gs["loss_sum"]) and gs["loss_sum"] == pytest.approx(rs["loss_sum"], rel=1e-5)
    assert gs["grad_norm_sum"] == pytest.approx(rs["grad_norm_sum"], rel=1e-4)


class Mixed(nn.Module):
    """Hooked layers next to ones the engine cannot see into: a reflect-padded conv, a bare parameter,
    an embedding, a Linear applied twice (weight sharing within one forward), and a Linear whose
    weight is used without calling it (so its hook never fires)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.norm = nn.GroupNorm(2, 8)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 8, 4, 4))
        self.emb = nn.Embedding(5, 8)
        self.twice = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.bypassed = nn.Linear(8, 8, bias=False)

    def forward(self, x, label):
        h = torch.tanh(self.norm(self.reflect(self.conv(x)) + self.pos))
        h = h.mean((2, 3)) + self.emb(label)
        h = h + torch.nn.functional.linear(h, self.bypassed.weight)
        return self.head(torch.tanh(self.twice(torch.tanh(self.twice(h)))))


def mixed_problem(n: int = 5, k: int = 2):
    torch.manual_seed(0)
    model = Mixed()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, k, 3, 4, 4, generator=g)
    label = torch.randint(0, 5, (n,), generator=g)

    def batch_loss(p, xs, lab):                     # K rows per example, example-major, averaged
        out = functional_call(model, p, (xs.reshape(-1, 3, 4, 4), lab.repeat_interleave(xs.shape[1])))
        return out.pow(2).sum(1).reshape(len(xs), -1).mean(1)

    def one(p, xs, lab):
        return batch_loss(p, xs[None], lab[None])[0]
    return model, params, batch_loss, one, (x, label)


def test_fallback_parameters_join_the_same_norms():
    model, params, batch_loss, one, batch = mixed_problem()
    plan = plan_sites(model, params)
    assert set(plan.fallback) == {"reflect.weight", "reflect.bias", "pos", "emb.weight"}
    assert {"conv.weight", "norm.bias", "twice.weight", "head.bias"} <= set(plan.hooked)
    assert not supports(model, params)
    first = ["conv.weight", "pos", "twice.weight"]                 # hooked and fallback parameters together
    groups = [first, [n for n in params if n not in first]]
    for clip_groups in (None, groups):
        clip = 0.5 * typical_clip(model, params, batch_loss, batch)
        ref = clipped_grad_sum(one, params, batch, clip, 5, clip_groups=clip_groups)
        with pytest.warns(GhostClippingNotice) as notices:
            got = ghost_clipped_grad_sum(model, params, batch_loss, batch, clip, 2, clip_groups=clip_groups)
        assert_same(got, ref)
        text = " ".join(str(w.message) for w in notices)
        assert "4 trainable parameter(s)" in text and "layer bypassed" in text


def table_problem(rows: int):
    """A Linear applied to a fixed [rows, d] table (rows unrelated to the examples), then per example."""
    torch.manual_seed(0)
    table = torch.randn(rows, 6)
    model = nn.ModuleDict({"proj": nn.Linear(6, 6), "head": nn.Linear(6, 1)})
    params = dict(model.named_parameters())

    def batch_loss(p, x):
        keys = torch.func.functional_call(model["proj"], {"weight": p["proj.weight"], "bias": p["proj.bias"]}, (table,))
        out = torch.func.functional_call(model["head"], {"weight": p["head.weight"], "bias": p["head.bias"]},
                                         (torch.tanh(x @ keys.t() @ keys),))
        return out.squeeze(1).pow(2)

    def one(p, x):
        return batch_loss(p, x[None])[0]
    return model, params, batch_loss, one


def test_a_layer_called_on_rows_that_are_not_examples_falls_back():
    model, params, batch_loss, one = table_problem(3)
    x = torch.randn(4, 6)                     # 3 table rows, 4 examples: not a multiple, torch.func
    ref = clipped_grad_sum(one, params, (x,), 0.3, 4)
    with pytest.warns(GhostClippingNotice, match="layer proj .*not a multiple"):
        got = ghost_clipped_grad_sum(model, params, batch_loss, (x,), 0.3, 4)
    assert_same(got, ref)


def test_rows_per_example_tells_a_table_from_the_examples_rows():
    """The contract: a hooked layer's rows are the examples' rows. 6 table rows for 3 examples look like
    K = 2 and are misattributed; rows_per_example=1 (the trainer passes K) sends the layer to torch.func."""
    model, params, batch_loss, one = table_problem(6)
    x = torch.randn(3, 6)
    ref = clipped_grad_sum(one, params, (x,), 0.3, 3)
    wrong, _ = ghost_clipped_grad_sum(model, params, batch_loss, (x,), 0.3, 3)
    assert rel_err(wrong, ref[0]) > 1e-3
    with pytest.warns(GhostClippingNotice, match="layer proj "):
        got = ghost_clipped_grad_sum(model, params, batch_loss, (x,), 0.3, 3, rows_per_example=1)
    assert_same(got, ref)


def test_an_empty_slice_gives_zeros():
    """A rank whose slice of the Poisson batch is empty still returns a zero sum keyed like params."""
    unet, params, cond_dim = adapted("default", "lora")
    batch_loss, _ = loss_fns(unet)
    got, stats = ghost_clipped_grad_sum(unet, params, batch_loss, draws(0, 2, cond_dim), 1.0, 4)
    assert set(got) == set(params) and all(not v.any() for v in got.values())
    assert stats == {"n": 0, "loss_sum": 0.0, "grad_norm_sum": 0.0, "clipped": 0}


def test_choose_engine_and_errors():
    unet, params, _ = adapted("default", "lora")
    batch_loss, _ = loss_fns(unet)
    engine, line = choose_engine("auto", unet, params)
    assert engine == "ghost" and "auto" in line
    assert choose_engine("vmap", unet, params)[0] == "vmap"
    only_pos = {"pos": dict(Mixed().named_parameters())["pos"]}
    assert choose_engine("auto", Mixed(), only_pos)[0] == "vmap"
    with pytest.raises(DpldmError, match="privacy.clipping"):
        choose_engine("fast", unet, params)
    batch = draws(2, 1, 384)
    with pytest.raises(DpldmError, match="one loss per example"):
        ghost_clipped_grad_sum(unet, params, lambda p, *b: batch_loss(p, *b).sum(), batch, 1.0, 2)
    with pytest.raises(DpldmError, match="microbatch_size"):
        ghost_clipped_grad_sum(unet, params, batch_loss, batch, 1.0, 0)
    with pytest.raises(DpldmError, match="not found in the module"):
        ghost_clipped_grad_sum(unet, {"nope.weight": torch.zeros(1)}, batch_loss, batch, 1.0, 2)
    assert all(not p.requires_grad or p.grad is None for p in unet.parameters())   # nothing left in .grad
