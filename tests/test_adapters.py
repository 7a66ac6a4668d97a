"""Adapters (LoDA, LoRA, attention-only, full) on a tiny diffusers U-Net: exact identity at init,
freezing, gradient flow, counts, save/load, merge, diffusers LoRA loading, per-example grads."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from dpldm.config import AdapterConfig
from dpldm.errors import DpldmError
from dpldm.models.adapters import (ADAPTER_CONFIG, attach_adapter, count_parameters, load_adapter, merge_adapter,
                                   parameter_table, save_adapter, trainable_named_parameters)
from dpldm.models.loda import AdaptedLayer
from dpldm.models.lora import lora_state_dict_for_diffusers, save_lora_for_diffusers

KINDS = ["loda", "lora", "attention", "full"]


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)


def inputs(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 3, 32, generator=g))


def run(unet, x, t, c):
    return unet(x, t, encoder_hidden_states=c).sample


def perturb(unet, seed: int = 2, std: float = 0.05):
    """Move every trainable parameter (incl. zero-initialised B) so outputs and gradients are generic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_named_parameters(unet).values():
            p.add_(std * torch.randn(p.shape, generator=g))


def is_adapter_name(name: str) -> bool:
    return any(s in name for s in (".loda_A.", ".loda_B.", ".lora_A.", ".lora_B."))


@pytest.mark.parametrize("kind", KINDS)
def test_attach_is_exact_at_init_and_trains_only_adapter(kind):
    x, t, c = inputs()
    unet = tiny_unet()
    ref = run(unet, x, t, c)
    names = attach_adapter(unet, AdapterConfig(kind=kind))
    assert torch.equal(run(unet, x, t, c), ref)          # B = 0: the adapted model IS the pretrained one
    assert names == [n for n, p in unet.named_parameters() if p.requires_grad]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in unet.modules())
    if kind in ("loda", "lora"):
        assert names and all(is_adapter_name(n) for n in names)
        assert all(f".{kind}_" in n for n in names)
    elif kind == "attention":
        assert names and all(".attentions." in n for n in names)
        assert any(".attn2.to_k." in n for n in names) and any(".proj_in." in n for n in names)
        assert any(".norm1." in n for n in names) and any(".ff.net." in n for n in names)
    else:
        assert len(names) == len(list(unet.parameters()))

    # gradient reaches every trainable parameter once B is nonzero
    perturb(unet)
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable_named_parameters(unet).items()}
    loss = run(unet, x, t, c).square().mean()
    loss.backward()
    for n, p in trainable_named_parameters(unet).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in unet.named_parameters() if n in frozen)
    opt = torch.optim.Adam(trainable_named_parameters(unet).values(), lr=1e-2)
    opt.step()
    for n, p in unet.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
        else:
            assert not torch.equal(p, before[n]), f"trainable {n} did not move"


def test_parameter_counts_and_table():
    counts = {}
    for kind in KINDS:
        unet = tiny_unet()
        base_total = sum(p.numel() for p in unet.parameters())
        attach_adapter(unet, AdapterConfig(kind=kind))
        counts[kind] = count_parameters(unet)
        assert counts[kind][1] == base_total               # base count excludes adapter layers
        table = parameter_table(unet)
        assert f"adapter: {kind}" in table and f"{counts[kind][0]:,}" in table.splitlines()[-1]
    full = counts["full"][0]
    assert full == counts["full"][1]
    assert counts["loda"][0] < 0.15 * full and counts["attention"][0] < 0.3 * full
    assert counts["loda"][0] == counts["lora"][0]             # same A/B shapes, σ has no parameters
    # rank 4 LoDA on a 3×3 conv 32→32: A 4·32·9 + B 32·4
    unet = tiny_unet()
    attach_adapter(unet, AdapterConfig(kind="loda", name_pattern=r"^down_blocks\.0\.resnets\.0\.conv1$"))
    assert count_parameters(unet)[0] == 4 * 32 * 9 + 32 * 4
    assert "down_blocks.0" in parameter_table(unet)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(kind, tmp_path):
    x, t, c = inputs()
    cfg = AdapterConfig(kind=kind, rank=3, nonlinearity="tanh", scale=0.5, levels=["down", "mid", "up", "other"])
    unet = tiny_unet()
    attach_adapter(unet, cfg)
    perturb(unet)
    out = run(unet, x, t, c)
    save_adapter(unet, cfg, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert meta["kind"] == kind and meta["adapter"]["rank"] == 3 and "dpldm_version" in meta

    fresh = tiny_unet()
    assert not torch.allclose(run(fresh, x, t, c), out)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded == cfg
    assert torch.equal(run(fresh, x, t, c), out)
    assert list(trainable_named_parameters(fresh)) == list(trainable_named_parameters(unet))


def test_load_mismatch_errors(tmp_path):
    cfg = AdapterConfig(kind="loda")
    unet = tiny_unet()
    attach_adapter(unet, cfg)
    save_adapter(unet, cfg, tmp_path / "a")
    path = tmp_path / "a" / ADAPTER_CONFIG
    meta = json.loads(path.read_text())

    meta["adapter"]["rank"] = 2                               # shapes no longer match
    path.write_text(json.dumps(meta))
    with pytest.raises(DpldmError, match=r"loda_A\.weight has shape \(4,"):
        load_adapter(tiny_unet(), tmp_path / "a")

    meta["adapter"].update(rank=4, module_types=["linear"])  # conv adapters in the file are unexpected
    path.write_text(json.dumps(meta))
    with pytest.raises(DpldmError, match=r"unexpected keys \[.*conv.*loda_A\.weight"):
        load_adapter(tiny_unet(), tmp_path / "a")

    meta["adapter"]["module_types"] = ["conv", "linear"]
    meta["adapter"]["levels"] = ["down", "mid", "up", "other"]  # conv_in etc. missing from the file
    path.write_text(json.dumps(meta))
    with pytest.raises(DpldmError, match=r"missing keys \[.*conv_in\.loda_A\.weight"):
        load_adapter(tiny_unet(), tmp_path / "a")

    meta["adapter"]["rank"] = "four"
    path.write_text(json.dumps(meta))
    with pytest.raises(DpldmError, match=r"adapter_config\.json: .*adapter\.rank expects int"):
        load_adapter(tiny_unet(), tmp_path / "a")
    with pytest.raises(DpldmError, match=r"no adapter_config\.json"):
        load_adapter(tiny_unet(), tmp_path)


@pytest.mark.parametrize("kind,nonlinearity", [("lora", "identity"), ("loda", "identity"),
                                               ("attention", "leaky_relu"), ("full", "leaky_relu")])
def test_merge_equals_unmerged(kind, nonlinearity):
    x, t, c = inputs()
    unet = tiny_unet()
    attach_adapter(unet, AdapterConfig(kind=kind, nonlinearity=nonlinearity, scale=0.7))
    perturb(unet)
    out = run(unet, x, t, c)
    merged = merge_adapter(unet)
    assert type(merged) is UNet2DConditionModel
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert merged.state_dict().keys() == tiny_unet().state_dict().keys()   # plain diffusers layout
    torch.testing.assert_close(run(merged, x, t, c), out, rtol=1e-5, atol=1e-5)
    assert torch.equal(run(unet, x, t, c), out)              # the original is left adapted
    if kind in ("lora", "loda"):
        assert not torch.allclose(run(tiny_unet(), x, t, c), out, atol=1e-3)   # merge did change W


def test_nonlinear_loda_refuses_merge_and_lora_export():
    unet = tiny_unet()
    attach_adapter(unet, AdapterConfig(kind="loda"))
    with pytest.raises(DpldmError, match="leaky_relu.*cannot be merged"):
        merge_adapter(unet)
    with pytest.raises(DpldmError, match="cannot express"):
        lora_state_dict_for_diffusers(unet)
    full = tiny_unet()
    attach_adapter(full, AdapterConfig(kind="full"))
    with pytest.raises(DpldmError, match="no LoRA/LoDA adapter layers"):
        lora_state_dict_for_diffusers(full)


def tiny_sd_pipeline(unet):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=100, max_position_embeddings=16))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)


def test_diffusers_load_lora_weights_matches_merged(tmp_path):
    """LoRA → peft keys → StableDiffusionPipeline.load_lora_weights reproduces the merged U-Net;
    identity-σ LoDA exports the same way (through a folder on disk)."""
    x, t, c = inputs()
    for kind, source in (("lora", "dict"), ("loda", "folder")):
        unet = tiny_unet()
        attach_adapter(unet, AdapterConfig(kind=kind, nonlinearity="identity", rank=2, scale=0.5,
                                           levels=["down", "mid", "up", "other"]))
        perturb(unet)
        want = run(merge_adapter(unet), x, t, c)
        sd = lora_state_dict_for_diffusers(unet)
        assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in sd
        assert "unet.down_blocks.0.downsamplers.0.conv.lora_A.weight" in sd     # a strided conv

        pipe = tiny_sd_pipeline(tiny_unet())
        base_out = run(pipe.unet, x, t, c)
        if source == "dict":
            pipe.load_lora_weights(sd)
        else:
            save_lora_for_diffusers(unet, tmp_path / "lora")
            pipe.load_lora_weights(str(tmp_path / "lora"))
        torch.testing.assert_close(run(pipe.unet, x, t, c), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base_out, want, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_per_example_grads_match_loop(kind):
    from torch.func import functional_call, grad, vmap
    x, t, c = inputs(n=3)
    unet = tiny_unet()
    attach_adapter(unet, AdapterConfig(kind=kind, levels=["down", "mid", "up", "other"]))
    perturb(unet)
    params = {k: v.detach() for k, v in trainable_named_parameters(unet).items()}
    buffers = dict(unet.named_buffers())

    def loss(p, xi, ti, ci):
        out = functional_call(unet, {**p, **buffers}, (xi[None], ti[None]), {"encoder_hidden_states": ci[None]})
        return out.sample.square().mean()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, t, c)
    for i in range(3):
        unet.zero_grad(set_to_none=True)
        run(unet, x[i:i + 1], t[i:i + 1], c[i:i + 1]).square().mean().backward()
        for name, p in trainable_named_parameters(unet).items():
            torch.testing.assert_close(per_example[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def adapted_names(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, AdaptedLayer)]


def test_targeting_by_type_name_and_level():
    u = tiny_unet()
    attach_adapter(u, AdapterConfig(kind="lora", module_types=["conv"]))
    assert adapted_names(u) and all(isinstance(u.get_submodule(n), nn.Conv2d) for n in adapted_names(u))
    assert "down_blocks.0.resnets.0.conv1" in adapted_names(u)

    u = tiny_unet()
    attach_adapter(u, AdapterConfig(kind="loda", module_types=["linear"]))
    assert all(isinstance(u.get_submodule(n), nn.Linear) for n in adapted_names(u))
    assert "mid_block.resnets.0.time_emb_proj" in adapted_names(u)

    u = tiny_unet()
    attach_adapter(u, AdapterConfig(kind="lora", name_pattern=r"attn2\.to_(k|v)$"))
    assert sorted(adapted_names(u)) == sorted(n for n, _ in tiny_unet().named_modules()
                                              if n.endswith(("attn2.to_k", "attn2.to_v")))
    assert len(adapted_names(u)) == 8                         # 4 transformers (down.0, mid, 2 in up.1) × k, v

    for levels, prefixes in ((["down"], ("down_blocks.",)), (["up.0"], ("up_blocks.0.",)),
                             (["mid", "down.1"], ("mid_block.", "down_blocks.1."))):
        u = tiny_unet()
        attach_adapter(u, AdapterConfig(kind="loda", levels=levels))
        names = adapted_names(u)
        assert names and all(n.startswith(prefixes) for n in names)
        assert all(any(n.startswith(p) for n in names) for p in prefixes)

    u = tiny_unet()
    attach_adapter(u, AdapterConfig(kind="loda", levels=["other"]))
    assert sorted(adapted_names(u)) == ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]

    u = tiny_unet()
    names = attach_adapter(u, AdapterConfig(kind="attention", levels=["mid"], name_pattern="attn2"))
    assert names and all(n.startswith("mid_block.attentions.0.") and ".attn2." in n for n in names)


@pytest.mark.parametrize("cfg,match", [
    (AdapterConfig(kind="loda", name_pattern="no_such_layer"), "selects no layer"),
    (AdapterConfig(kind="attention", levels=["down.1"]), "selects no attention parameter"),
    (AdapterConfig(kind="lora", levels=["side"]), "adapter.levels: 'side'"),
    (AdapterConfig(kind="lora", levels=["up.5"]), "has 2 up blocks"),
    (AdapterConfig(kind="lora", name_pattern="("), "not a valid regex"),
    (AdapterConfig(kind="loda", rank=0), "adapter.rank"),
    (AdapterConfig(kind="loda", module_types=["batchnorm"]), "adapter.module_types"),
])
def test_bad_targeting_is_a_clear_error(cfg, match):
    unet = tiny_unet()
    with pytest.raises(DpldmError, match=match):
        attach_adapter(unet, cfg)


def test_attach_twice_is_refused():
    unet = tiny_unet()
    attach_adapter(unet, AdapterConfig(kind="lora"))
    with pytest.raises(DpldmError, match="already has a dpldm adapter"):
        attach_adapter(unet, AdapterConfig(kind="lora"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["loda", "attention"])
def test_cuda_adapter_on_device_and_per_example_grads(kind):
    """Same logic as the CPU tests, on CUDA: A/B live on W's device; vmap(grad) matches a loop."""
    from torch.func import functional_call, grad, vmap
    unet = tiny_unet().cuda()
    attach_adapter(unet, AdapterConfig(kind=kind))
    trainable = trainable_named_parameters(unet)
    assert all(p.is_cuda for p in trainable.values())
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    x, t, c = (v.cuda() for v in inputs(n=2))
    params = {k: v.detach() for k, v in trainable_named_parameters(unet).items()}

    def loss(p, xi, ti, ci):
        out = functional_call(unet, p, (xi[None], ti[None]), {"encoder_hidden_states": ci[None]})
        return out.sample.square().mean()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, t, c)
    for i in range(2):
        unet.zero_grad(set_to_none=True)
        run(unet, x[i:i + 1], t[i:i + 1], c[i:i + 1]).square().mean().backward()
        for name, p in trainable_named_parameters(unet).items():
            torch.testing.assert_close(per_example[name][i], p.grad, rtol=1e-3, atol=1e-5, msg=name)
