"""SD-layout pipelines: build tiny parts from a config, save, load with dpldm and plain diffusers."""
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from diffusers import VQModel

from dpldm.config import ModelConfig
from dpldm.errors import DpldmError
from dpldm.models import pipeline as P
from dpldm.models.text_encoders import load_text_encoder


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(channels=1, resolution=16, latent_channels=4, vae_block_channels=[8, 16],
                unet_block_channels=[16, 32], unet_attention=[False, True], norm_groups=8,
                unet_attention_head_dim=4, max_text_length=8, class_names=["zero", "one"],
                prompt_template="a digit {name}")
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    m = tiny_model_cfg()
    tok, te = load_text_encoder("minilm", m.max_text_length)
    vae = P.build_vae(m)
    unet = P.build_unet(m, te.config.hidden_size, P.latent_size(vae, m.resolution))
    comps = P.Components(vae, unet, te, tok, P.build_scheduler(m), P.make_meta(m, "test"))
    folder = tmp_path_factory.mktemp("pipe") / "sd"
    P.save_pipeline(comps, folder)
    return folder, comps


def test_build_matches_config():
    m = tiny_model_cfg()
    vae = P.build_vae(m)
    assert vae.config.in_channels == vae.config.out_channels == 1
    assert P.vae_factor(vae) == 2 and P.latent_size(vae, 16) == 8
    unet = P.build_unet(m, 384, 8)
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D")
    assert unet.config.cross_attention_dim == 384 and unet.config.in_channels == 4
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in unet.modules())
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in vae.modules())


def test_build_rejects_bad_config():
    with pytest.raises(DpldmError, match="norm_groups"):
        P.build_vae(tiny_model_cfg(vae_block_channels=[8, 12]))
    with pytest.raises(DpldmError, match="unet_attention"):
        P.build_unet(tiny_model_cfg(unet_attention=[True]), 384, 8)
    with pytest.raises(DpldmError, match="resolution"):
        P.build_vae(tiny_model_cfg(resolution=15))
    with pytest.raises(DpldmError, match="multiple"):
        P.latent_size(P.build_vae(tiny_model_cfg()), 17)


def test_save_writes_sd_layout(saved):
    folder, _ = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((folder / "dpldm.json").read_text())
    assert meta["class_names"] == ["zero", "one"] and meta["channels"] == 1 and meta["resolution"] == 16


def test_load_pipeline_frozen_and_meta(saved):
    folder, comps = saved
    c = P.load_pipeline(folder)
    assert isinstance(c.scheduler, diffusers.DDPMScheduler)
    assert c.meta["prompt_template"] == "a digit {name}"
    for part in (c.vae, c.unet, c.text_encoder):
        assert not any(p.requires_grad for p in part.parameters())
    assert not c.vae.training and not c.text_encoder.training
    assert c.unet.dtype == torch.float32 and c.vae.dtype == torch.float32
    assert c.tokenizer.model_max_length == 8
    for (k, v), v0 in zip(c.unet.state_dict().items(), comps.unet.state_dict().values()):
        assert torch.equal(v, v0), k


def test_encode_prompts_matches_diffusers(saved):
    folder, comps = saved
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    prompts = P.class_prompts(["zero", "one"], "a digit {name}")
    assert prompts == ["a digit zero", "a digit one"]
    pos, neg = pipe.encode_prompt(prompts, "cpu", 1, True, None)
    c = P.load_pipeline(folder)
    mine = P.encode_prompts(c, prompts)
    assert mine.shape == (2, 8, 384)
    torch.testing.assert_close(mine, pos.float(), rtol=0, atol=0)
    torch.testing.assert_close(P.encode_prompts((c.tokenizer, c.text_encoder), ["", ""]), neg.float())
    assert not torch.allclose(mine[0], mine[1])


def test_plain_diffusers_generates_grayscale(saved):
    folder, _ = saved
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    out = pipe(["a digit zero"], num_inference_steps=2, guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 1)
    assert np.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1
    img = pipe(["a digit one"], num_inference_steps=2, output_type="pil").images[0]
    assert img.mode == "L" and img.size == (16, 16)


def test_encode_decode_scaling(saved):
    _, comps = saved
    vae = comps.vae
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    vae.config.scaling_factor = 1.0
    m1, s1 = P.encode_images(vae, x)
    vae.config.scaling_factor = 0.5
    m2, s2 = P.encode_images(vae, x)
    assert m1.shape == (2, 4, 8, 8)
    torch.testing.assert_close(m2, m1 * 0.5)
    torch.testing.assert_close(s2, s1 * 0.5)
    assert (s1 > 0).all()
    y = P.decode_latents(vae, m2)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    vae.config.scaling_factor = 0.18215


def test_class_prompts_needs_placeholder():
    assert P.class_prompts(["a", "b"], "class {id}: {name}") == ["class 0: a", "class 1: b"]
    with pytest.raises(DpldmError, match="prompt_template"):
        P.class_prompts(["a"], "no placeholder")


def test_wrong_layout_errors(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(DpldmError, match="does not exist"):
        P.load_pipeline(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(DpldmError, match=r"broken.*missing unet/"):
        P.load_pipeline(broken)
    shutil.copytree(folder / "unet", broken / "unet")
    (broken / "dpldm.json").write_text("{not json")
    with pytest.raises(DpldmError, match="dpldm.json"):
        P.load_pipeline(broken)
    (broken / "dpldm.json").unlink()
    cfg = json.loads((broken / "vae" / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderTiny"
    (broken / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DpldmError, match="AutoencoderKL or VQModel"):
        P.load_pipeline(broken)


def test_vqmodel_vae_accepted(saved, tmp_path):
    folder, _ = saved
    vq_folder = tmp_path / "vq"
    shutil.copytree(folder, vq_folder)
    shutil.rmtree(vq_folder / "vae")
    VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
            norm_num_groups=8, num_vq_embeddings=32).save_pretrained(vq_folder / "vae")
    c = P.load_pipeline(vq_folder)
    assert isinstance(c.vae, VQModel)
    assert c.meta["resolution"] == 16   # no dpldm.json needed? it is copied; still consistent
    mean, std = P.encode_images(c.vae, torch.zeros(1, 1, 16, 16))
    assert mean.shape == (1, 4, 8, 8) and torch.count_nonzero(std) == 0
    assert P.decode_latents(c.vae, mean).shape == (1, 1, 16, 16)


def test_save_keeps_fp32_files_for_bf16_parts(saved, tmp_path):
    """On CUDA the frozen VAE/text encoder run in bf16; saving must still write fp32 and restore bf16."""
    from safetensors import safe_open
    folder, _ = saved
    c = P.load_pipeline(folder)
    c.vae.to(torch.bfloat16)
    c.text_encoder.to(torch.bfloat16)
    P.save_pipeline(c, tmp_path / "again")
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        with safe_open(str(tmp_path / "again" / part), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float32
    assert c.vae.dtype == torch.bfloat16 and c.text_encoder.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_dtypes_and_encoding(saved):
    folder, _ = saved
    c = P.load_pipeline(folder, device="cuda")
    assert c.vae.dtype == torch.bfloat16 and c.text_encoder.dtype == torch.bfloat16
    assert c.unet.dtype == torch.float32 and c.unet.device.type == "cuda"
    emb = P.encode_prompts(c, ["a digit zero"])
    assert emb.dtype == torch.float32 and emb.is_cuda
    mean, std = P.encode_images(c.vae, torch.zeros(1, 1, 16, 16))
    assert mean.dtype == torch.float32 and mean.is_cuda
    with torch.no_grad():
        out = c.unet(mean, torch.tensor([10], device="cuda"), encoder_hidden_states=emb).sample
    assert torch.isfinite(out).all()


def test_sd15_style_folder_with_clip(saved, tmp_path):
    """A Stable-Diffusion-1.5-shaped folder: CLIPTextModel + a CLIPTokenizer given as vocab.json/merges.txt
    only (no tokenizer.json), PNDM scheduler: dpldm loads it and trains with DDPM betas from it."""
    from diffusers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from dpldm.models.text_encoders import _clip_bpe
    folder, comps = saved
    sd = tmp_path / "sd15"
    shutil.copytree(folder, sd)
    for part in ("text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(sd / part)
    vocab, merges = _clip_bpe()
    (sd / "tokenizer").mkdir()
    (sd / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (sd / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (sd / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 8, "pad_token": "<|endoftext|>",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=384, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8)).save_pretrained(sd / "text_encoder")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  skip_prk_steps=True).save_pretrained(sd / "scheduler")
    index = json.loads((sd / "model_index.json").read_text())
    index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                 scheduler=["diffusers", "PNDMScheduler"])
    (sd / "model_index.json").write_text(json.dumps(index))
    (sd / "dpldm.json").unlink()
    c = P.load_pipeline(sd)
    assert type(c.text_encoder).__name__ == "CLIPTextModel" and len(c.tokenizer) == 49408
    assert isinstance(c.scheduler, diffusers.DDPMScheduler)
    torch.testing.assert_close(c.scheduler.alphas_cumprod, comps.scheduler.alphas_cumprod)
    assert c.meta["class_names"] == [] and c.meta["resolution"] == 16
    pipe = diffusers.DiffusionPipeline.from_pretrained(sd)
    pos, _ = pipe.encode_prompt(["a dog"], "cpu", 1, False, None)
    torch.testing.assert_close(P.encode_prompts(c, ["a dog"]), pos)
