"""Per-example clipped gradient sums, noise once per logical step, DP-compatibility checks."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dpldm.errors import DpldmError
from dpldm.privacy.dp_step import (add_noise_and_normalize, assert_dp_compatible, clipped_grad_sum,
                                   noise_generator)
from dpldm.rng import NOISE_TAILS, NoiseStream, RunRandomness


class TinyDenoiser(nn.Module):
    """Conv2d + GroupNorm + self-attention (SDPA) + Linear: the layer types a latent U-Net has."""

    def __init__(self, c: int = 4, hidden: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(c, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(2, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.conv_out = nn.Conv2d(hidden, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # x: [B, C, H, W]
        h = F.silu(self.norm(self.conv_in(x)))
        b, ch, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)                # [B, HW, ch]
        q, k, v = self.qkv(tokens).reshape(b, hh * ww, 3, 2, ch // 2).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, hh * ww, ch)
        h = h + self.proj(att).transpose(1, 2).reshape(b, ch, hh, ww)
        return self.conv_out(h)


def make_problem(batch: int = 7, k: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyDenoiser()
    x = torch.randn(batch, 4, 4, 4)
    noise = torch.randn(batch, k, 4, 4, 4) * 0.5         # K noise-multiplicity draws per example
    scale = torch.rand(batch, k) + 0.5                   # stands in for a per-draw timestep weight

    def loss_fn(params, xi, ni, si):                     # ONE example: mean over its K draws
        noisy = xi.unsqueeze(0) + ni * si.view(-1, 1, 1, 1)
        pred = functional_call(model, params, (noisy,))
        return ((pred - ni) ** 2).mean(dim=(1, 2, 3)).mean()

    params = {k_: p for k_, p in model.named_parameters()}
    return model, loss_fn, params, (x, noise, scale)


def naive_clipped_sum(loss_fn, params, batch, max_grad_norm):
    """Reference: autograd one example at a time, clip the whole flat gradient, sum."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    total = {k: torch.zeros_like(v) for k, v in leaves.items()}
    norms = []
    for i in range(batch[0].shape[0]):
        loss = loss_fn(leaves, *(t[i] for t in batch))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        norms.append(norm)
        factor = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (norm + 1e-6))
        for (k, _), g in zip(leaves.items(), grads):
            total[k] += factor * g
    return total, norms


def rel_err(a: dict, b: dict) -> float:
    num = math.sqrt(sum(((a[k] - b[k]).double() ** 2).sum().item() for k in a))
    den = math.sqrt(sum((b[k].double() ** 2).sum().item() for k in b))
    return num / den


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("microbatch", [1, 3, 7])
def test_clipped_sum_matches_per_example_loop(k, microbatch):
    _, loss_fn, params, batch = make_problem(batch=7, k=k)
    _, norms = naive_clipped_sum(loss_fn, params, batch, None)
    clip = sorted(norms)[3]                              # clips about half the examples
    ref, _ = naive_clipped_sum(loss_fn, params, batch, clip)
    got, stats = clipped_grad_sum(loss_fn, params, batch, clip, microbatch)
    assert set(got) == set(params)
    assert rel_err(got, ref) < 1e-5
    assert stats["n"] == 7
    assert stats["clipped"] == sum(n > clip for n in norms) == 3
    assert stats["grad_norm_sum"] == pytest.approx(sum(norms), rel=1e-5)
    losses = [loss_fn(params, *(t[i] for t in batch)).item() for i in range(7)]
    assert stats["loss_sum"] == pytest.approx(sum(losses), rel=1e-5)


def test_clipping_bounds_each_example_and_none_means_unclipped():
    _, loss_fn, params, batch = make_problem(batch=4, k=2)
    ref, norms = naive_clipped_sum(loss_fn, params, batch, None)
    got, stats = clipped_grad_sum(loss_fn, params, batch, None, 2)
    assert rel_err(got, ref) < 1e-5 and stats["clipped"] == 0
    tiny = min(norms) / 10                               # every example clipped to norm `tiny`
    one = [clipped_grad_sum(loss_fn, params, tuple(t[i:i + 1] for t in batch), tiny, 1)[0] for i in range(4)]
    for g in one:
        assert math.sqrt(sum((v ** 2).sum().item() for v in g.values())) == pytest.approx(tiny, rel=1e-4)


def test_clip_groups_clip_each_group_to_c_over_sqrt_g_against_a_loop():
    """Per-group clipping: each group of each example's gradient is clipped to C/√G separately
    (naive per-example loop as reference), so the example's whole contribution stays <= C."""
    _, loss_fn, params, batch = make_problem(batch=5, k=2)
    groups = [["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"],
              [k for k in params if not k.startswith(("qkv", "proj"))]]
    clip = 1e-3                                          # far below every group norm: all clipped
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(5):
        one = tuple(t[i:i + 1] for t in batch)
        g, _ = clipped_grad_sum(loss_fn, params, one, None, 1)
        for members in groups:
            norm = math.sqrt(sum((g[k].double() ** 2).sum().item() for k in members))
            for k in members:
                want[k] += g[k] * min(1.0, clip / math.sqrt(2) / (norm + 1e-6))
        single, stats = clipped_grad_sum(loss_fn, params, one, clip, 1, clip_groups=groups)
        total = math.sqrt(sum((v.double() ** 2).sum().item() for v in single.values()))
        assert total == pytest.approx(clip, rel=1e-4) and stats["clipped"] == 1
        flat, _ = clipped_grad_sum(loss_fn, params, one, clip, 1)
        assert rel_err(single, flat) > 1e-3              # a different (still norm-C) direction
    got, stats = clipped_grad_sum(loss_fn, params, batch, clip, 2, clip_groups=groups)
    assert rel_err(got, want) < 1e-5 and stats["clipped"] == 5
    with pytest.raises(DpldmError, match="partition"):
        clipped_grad_sum(loss_fn, params, batch, clip, 2, clip_groups=groups[:1])
    with pytest.raises(DpldmError, match="in clip groups 0 and 1"):
        clipped_grad_sum(loss_fn, params, batch, clip, 2, clip_groups=[groups[0], groups[0] + groups[1]])


def test_k_draws_are_averaged_before_clipping():
    """Clipping the mean of K draws (DPDM) differs from averaging K separately clipped draws."""
    _, loss_fn, params, batch = make_problem(batch=1, k=4)
    x, noise, scale = batch
    clip = 1e-3
    averaged, _ = clipped_grad_sum(loss_fn, params, batch, clip, 1)
    norm = math.sqrt(sum((v ** 2).sum().item() for v in averaged.values()))
    assert norm == pytest.approx(clip, rel=1e-4)         # one example contributes at most C
    per_draw = tuple(t.expand(4, *t.shape[1:]) for t in (x,)) + (noise[0].unsqueeze(1), scale[0].unsqueeze(1))
    separately, _ = clipped_grad_sum(loss_fn, params, per_draw, clip, 4)
    assert rel_err({k: v / 4 for k, v in separately.items()}, averaged) > 1e-3


def test_empty_batch_gives_zero_grads():
    _, loss_fn, params, batch = make_problem(batch=3)
    got, stats = clipped_grad_sum(loss_fn, params, tuple(t[:0] for t in batch), 1.0, 4)
    assert stats == {"n": 0, "loss_sum": 0.0, "grad_norm_sum": 0.0, "clipped": 0}
    assert all(v.shape == params[k].shape and not v.any() for k, v in got.items())


def test_noise_std_is_sigma_c_over_expected_batch():
    sigma, clip, q, n = 1.3, 0.7, 0.01, 5000             # expected batch qN = 50
    zeros = {"a": torch.zeros(300, 400), "b": torch.zeros(50_000)}
    out = add_noise_and_normalize(zeros, sigma, clip, q * n, noise_generator(1, 0))
    draws = torch.cat([v.flatten() for v in out.values()]).double()
    expected = sigma * clip / (q * n)
    # 170k draws: the std estimate's relative standard error is ~0.17%; 1% is ~6 standard errors
    assert draws.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(draws.mean().item()) < 5 * expected / math.sqrt(draws.numel())


def test_noise_is_drawn_once_per_logical_step_whatever_the_microbatching():
    _, loss_fn, params, batch = make_problem(batch=6, k=2)
    sigma, clip, ebs = 2.0, 0.05, 6.0
    results = []
    for mb in (1, 4, 6):
        gsum, _ = clipped_grad_sum(loss_fn, params, batch, clip, mb)
        results.append((gsum, add_noise_and_normalize(gsum, sigma, clip, ebs, noise_generator(3, 11))))
    for gsum, noised in results[1:]:
        assert rel_err(noised, results[0][1]) < 1e-5
    gsum, noised = results[0]
    # the added noise is exactly one fresh draw of N(0, σ²C²) per coordinate from the step's generator
    gen = noise_generator(3, 11)
    for k in sorted(gsum):
        draw = gen.normal(gsum[k].shape)
        torch.testing.assert_close(noised[k] * ebs - gsum[k], draw * sigma * clip, rtol=1e-4, atol=1e-5)


def test_noise_generator_depends_on_seed_and_step_only():
    a = noise_generator(7, 3).normal((5,))
    assert torch.equal(a, noise_generator(7, 3).normal((5,)))
    assert not torch.equal(a, noise_generator(7, 4).normal((5,)))
    assert not torch.equal(a, noise_generator(8, 3).normal((5,)))
    # 128-bit seeds: seeds that agree in their low 32 or 64 bits still give different noise
    # (torch's CPU generator keeps only 32 bits of a seed: it is not used for the DP noise)
    assert not torch.equal(noise_generator(5, 0).normal((5,)), noise_generator(5 + 2**32, 0).normal((5,)))
    assert not torch.equal(noise_generator(5, 0).normal((5,)), noise_generator(5 + 2**64, 0).normal((5,)))


def test_secure_noise_is_standard_normal_and_keyed_by_seed_and_step():
    z = noise_generator(11, 2, secure=True).normal((200_000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z.abs() > 1.96).float().mean()) - 0.05) < 0.003          # Gaussian tails
    assert torch.equal(z, noise_generator(11, 2, secure=True).normal((200_000,)))
    assert not torch.equal(z, noise_generator(11, 3, secure=True).normal((200_000,)))
    assert not torch.equal(z, noise_generator(11, 2).normal((200_000,)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_noise_is_drawn_in_float64_and_rounded_so_its_tail_is_not_cut_short(device):
    # float32 samplers end their tails at 6.76 sigma (CUDA Box-Muller) or 8.21 (numpy's ziggurat): outputs past a
    # neighbour's last draw would be impossible under it (docs/privacy.md, "Floating point"); float64 draws reach
    # 8.65 (CUDA) and 13.7 (CPU)
    rng = RunRandomness(13)
    z = NoiseStream(rng, "noise", 4, device=device).normal((4000,))
    if device == "cpu":
        ref = torch.from_numpy(rng.numpy("noise", 4).standard_normal(4000)).float()
    else:
        ref = torch.randn(4000, generator=rng.torch("noise", 4, device=device), device=device,
                          dtype=torch.float64).float()
    assert z.dtype == torch.float32 and torch.equal(z, ref)
    assert min(NOISE_TAILS.values()) > math.sqrt(-2 * math.log(2.0 ** -33)) + 1.5   # every stream past float32's 6.76


def test_zero_noise_only_normalizes_and_bad_values_are_refused():
    g = {"w": torch.ones(3)}
    out = add_noise_and_normalize(g, 0.0, None, 4.0, noise_generator(0, 0))
    assert torch.equal(out["w"], torch.full((3,), 0.25))
    with pytest.raises(DpldmError, match="clipping norm"):
        add_noise_and_normalize(g, 1.0, None, 4.0, noise_generator(0, 0))
    with pytest.raises(DpldmError, match="expected_batch_size"):
        add_noise_and_normalize(g, 1.0, 1.0, 0, noise_generator(0, 0))
    _, loss_fn, params, batch = make_problem(batch=2)
    with pytest.raises(DpldmError, match="microbatch_size"):
        clipped_grad_sum(loss_fn, params, batch, 1.0, 0)
    with pytest.raises(DpldmError, match="max_grad_norm"):
        clipped_grad_sum(loss_fn, params, batch, -1.0, 2)


def test_batchnorm_is_rejected_with_its_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    with pytest.raises(DpldmError, match=r"'1\.1' is a BatchNorm2d"):
        assert_dp_compatible(model)
    with pytest.raises(DpldmError, match="running statistics"):
        assert_dp_compatible(nn.Sequential(nn.InstanceNorm2d(4, track_running_stats=True)))
    assert_dp_compatible(TinyDenoiser())                  # GroupNorm is fine


def test_trainable_parameters_outside_params_are_rejected():
    model = TinyDenoiser()
    for p in model.parameters():
        p.requires_grad_(False)
    model.proj.weight.requires_grad_(True)
    model.qkv.weight.requires_grad_(True)
    assert_dp_compatible(model, {"proj.weight": model.proj.weight, "qkv.weight": model.qkv.weight})
    with pytest.raises(DpldmError, match="qkv.weight"):
        assert_dp_compatible(model, {"proj.weight": model.proj.weight})
    with pytest.raises(DpldmError, match="not found"):
        assert_dp_compatible(model, {"nope": model.proj.weight})


def test_non_finite_examples_contribute_zero_and_keep_loss_and_weights_finite():
    """Issue 11 §7: an example whose gradient (any clip group) or loss is NaN/Inf adds nothing (factor 0, still
    bounded by C), never a NaN sum; the loss sum and a noisy SGD update stay finite; nothing counts them."""
    _, loss_fn, params, batch = make_problem(batch=6, k=2)
    x, noise, scale = (t.clone() for t in batch)
    x[1] = float("nan")                                  # NaN input: NaN loss and gradient
    x[4, 0, 0, 0] = float("inf")                         # Inf input: non-finite gradient
    bad = (x, noise, scale)
    good = tuple(t[[0, 2, 3, 5]] for t in bad)
    groups = [["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"],
              [k for k in params if not k.startswith(("qkv", "proj"))]]
    for clip, cg in ((0.05, None), (0.05, groups), (None, None)):
        for mb in (1, 4):
            got, stats = clipped_grad_sum(loss_fn, params, bad, clip, mb, clip_groups=cg)
            want, want_stats = clipped_grad_sum(loss_fn, params, good, clip, mb, clip_groups=cg)
            assert all(torch.isfinite(v).all() for v in got.values())
            assert rel_err(got, want) < 1e-6
            assert set(stats) == {"n", "loss_sum", "grad_norm_sum", "clipped"}   # no count of dropped examples
            assert math.isfinite(stats["loss_sum"]) and stats["loss_sum"] == pytest.approx(want_stats["loss_sum"])
            assert math.isfinite(stats["grad_norm_sum"]) and stats["clipped"] == want_stats["clipped"]
    got, _ = clipped_grad_sum(loss_fn, params, bad, 0.05, 3)
    step = add_noise_and_normalize(got, 1.0, 0.05, 6.0, noise_generator(0, 0))
    new = {k: params[k].detach() - 0.1 * step[k] for k in params}
    assert all(torch.isfinite(v).all() for v in new.values())
    single, _ = clipped_grad_sum(loss_fn, params, tuple(t[1:2] for t in bad), 0.05, 1)
    assert all(not v.any() for v in single.values())     # its whole contribution is exactly zero
