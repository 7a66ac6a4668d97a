"""Public pretraining: losses, EMA, scaling factor, and a short streamed run (autoencoder, then U-Net)
whose outputs plain diffusers loads and samples from; re-running the same command resumes."""
import json

import diffusers
import numpy as np
import pytest
import torch

from dpldm.cli import main as cli_main
from dpldm.config import ModelConfig, load_config
from dpldm.data.pack import pack
from dpldm.models import pipeline as P
from dpldm.models.ema import EMA
from dpldm.train.pretrain import autoencoder_loss, measure_scaling_factor, run_pretrain

TINY = ["model.channels=1", "model.resolution=16", "model.vae_block_channels=[8,16]",
        "model.unet_block_channels=[16,32]", "model.unet_attention=[false,true]", "model.norm_groups=8",
        "model.unet_attention_head_dim=4", "model.max_text_length=8", "data.batch_size=16",
        "data.shuffle_buffer=64", "optim.lr=2e-3", "train.log_every=100", "train.checkpoint_every=1000",
        "sample.steps=2", "model.ema_decay=0.9"]


def test_ema_warmup_update_and_state():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.99)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        m.weight.fill_(1.0)
    before = ema.shadow["weight"].clone()
    ema.update(m)
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * before + 0.9 * torch.ones(2, 2))
    other = EMA(torch.nn.Linear(2, 2), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    target = torch.nn.Linear(2, 2)
    torch.testing.assert_close(other.copy_to(target).weight.detach(), ema.shadow["weight"])


def test_autoencoder_loss_and_scaling_factor():
    torch.manual_seed(0)
    m = ModelConfig(channels=1, resolution=16, vae_block_channels=[8, 16], norm_groups=8)
    vae = P.build_vae(m)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    loss, parts = autoencoder_loss(vae, x)
    assert loss.ndim == 0 and parts["l1"] > 0 and parts["kl"] >= 0
    loss.backward()
    assert vae.encoder.conv_in.weight.grad is not None
    scale = measure_scaling_factor(vae, [x[:4], x[4:]])
    vae.register_to_config(scaling_factor=scale)
    mean, std = P.encode_images(vae, x)
    z = mean + std * torch.randn_like(mean)
    assert 0.8 < z.std().item() < 1.2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "mnist"
    pack("mnist", out, split="train", shard_size=64, limit=128, verbose=False)
    return out


def test_pretrain_autoencoder_then_unet(shards, tmp_path):
    out = tmp_path / "public"
    common = TINY + [f"data.public={shards}", f"output.dir={out}"]
    ae = run_pretrain(load_config(None, common + ["train.steps=40"]), "autoencoder")
    assert np.mean(ae.history[-8:]) < 0.8 * np.mean(ae.history[:4])
    vae = diffusers.AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.in_channels == 1 and vae.config.scaling_factor != 0.18215
    assert (out / "autoencoder" / "samples" / "step-00000040.png").is_file()

    names = [f"digit {i}" for i in range(10)]
    unet_args = common + ["train.steps=30", f"model.vae={out}", f"model.class_names={json.dumps(names)}",
                          "model.prompt_template=a {name}"]
    un = run_pretrain(load_config(None, unet_args), "unet")
    assert np.mean(un.history[-10:]) < np.mean(un.history[:3])
    assert (out / "unet" / "samples" / "step-00000030.png").is_file()
    meta = json.loads((out / "pipeline" / "dpldm.json").read_text())
    assert meta["class_names"] == names and meta["channels"] == 1
    pipe = diffusers.DiffusionPipeline.from_pretrained(out / "pipeline")
    images = pipe(["a digit 3"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 1) and np.isfinite(images).all()
    # the saved U-Net holds the EMA weights, not the raw ones
    saved = pipe.unet.state_dict()["conv_in.weight"]
    torch.testing.assert_close(saved, un.ema.shadow["conv_in.weight"])
    assert not torch.allclose(saved, un.unet.state_dict()["conv_in.weight"])

    # re-running the same command with more steps resumes at step 30 (EMA restored)
    assert cli_main(["pretrain", "unet", str(write_yaml(tmp_path))] + unet_args + ["train.steps=33"]) == 0
    state = json.loads(sorted((out / "unet" / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert state["step"] == 33


def write_yaml(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def test_pretrain_unet_needs_vae(shards, tmp_path):
    code = cli_main(["pretrain", "unet", str(write_yaml(tmp_path)), f"data.public={shards}", "train.steps=1"])
    assert code == 2


def test_condition_prompts():
    from dpldm.errors import DpldmError
    from dpldm.train.pretrain import condition_prompts
    assert condition_prompts([1, 0], ["", ""], ["zero", "one"], "a {name}") == ["a one", "a zero"]
    assert condition_prompts([-1, -1], ["a cat", "a dog"], [], "{name}") == ["a cat", "a dog"]
    assert condition_prompts([-1], [""], [], "{name}") == [""]
    with pytest.raises(DpldmError, match="mixes"):
        condition_prompts([0, -1], ["", ""], ["zero"], "{name}", ["k0", "k1"])
    with pytest.raises(DpldmError, match="class_names has 1"):
        condition_prompts([3], [""], ["zero"], "{name}")


def test_pretrain_unet_on_cached_public_latents(shards, tmp_path):
    """data.public_latents: the public set is encoded once (the same latents the streamed path encodes each
    step), each epoch visits every sample once, and a re-run resumes at the exact batch."""
    from dpldm.data.latent_cache import LatentCache
    from dpldm.data.stream import iterate_samples
    from dpldm.train.pretrain import CachedPublicBatches

    out = tmp_path / "public"
    common = TINY + [f"data.public={shards}", f"output.dir={out}"]
    run_pretrain(load_config(None, common + ["train.steps=4"]), "autoencoder")
    args = common + [f"model.vae={out}", "data.public_latents=true"]
    cfg = load_config(None, args + ["train.steps=12"])
    un = run_pretrain(cfg, "unet")
    assert np.isfinite(un.history).all() and (out / "pipeline" / "unet").is_dir()
    cache = LatentCache(out / "unet" / "latent_cache")
    assert len(cache) == 128
    keys = json.loads((cache.path / "keys.json").read_text())
    vae = P.load_vae(out / "vae", "cpu")
    for k, sample in zip(range(4), iterate_samples(str(shards), cfg.data, 16, 1)):
        mean, std = P.encode_images(vae, torch.as_tensor(sample["pixels"])[None])
        i = keys.index(sample["key"])
        torch.testing.assert_close(torch.from_numpy(np.array(cache.latents[i])), mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(np.array(cache.stds[i])), std[0], rtol=1e-4, atol=1e-5)
    # 128 samples in batches of 16: 8 per epoch, so 12 steps end in epoch 1 after 4 of its batches
    assert (un.data.epoch, un.data.pos) == (1, 4)
    batches = CachedPublicBatches(cache, cfg, un.env)
    seen = [next(batches)["key"] for _ in range(8)]
    assert len({k for b in seen for k in b}) == 128
    # a re-run with more steps resumes at epoch 1, batch 4, and the cache is reused, not rebuilt
    stamp = (cache.path / "latents.npy").stat().st_mtime_ns
    un2 = run_pretrain(load_config(None, args + ["train.steps=14"]), "unet")
    assert (un2.data.epoch, un2.data.pos) == (1, 6) and len(un2.history) == 2
    assert (cache.path / "latents.npy").stat().st_mtime_ns == stamp
