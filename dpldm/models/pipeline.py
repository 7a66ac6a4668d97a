"""Build, load and save Stable-Diffusion-layout pipeline folders; encode prompts, images, latents.

Every model dpldm reads or writes is a diffusers `StableDiffusionPipeline` folder (vae/, unet/,
text_encoder/, tokenizer/, scheduler/, model_index.json) plus `dpldm.json` with dpldm's metadata
(class_names, prompt_template, resolution, channels, source). See docs/models.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel, VQModel
from transformers import AutoTokenizer

from dpldm.errors import DpldmError
from dpldm.models.adapted_unet import AdaptedUNet2DConditionModel, component_entry
from dpldm.models.text_encoders import check_tokenizer, load_text_encoder

META_FILE = "dpldm.json"
PARTS = ("vae", "unet", "text_encoder", "tokenizer")


@dataclass
class Components:
    """The parts of one pipeline; `meta` is the content of dpldm.json."""
    vae: Any
    unet: UNet2DConditionModel
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# building from a ModelConfig

def _check_groups(name: str, channels: list[int], groups: int) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise DpldmError(f"config: model.{name} {channels} must be multiples of model.norm_groups={groups}")


def build_vae(model_cfg) -> AutoencoderKL:
    """A KL autoencoder with `model.channels` image channels; downsamples by 2^(levels-1)."""
    ch = list(model_cfg.vae_block_channels)
    _check_groups("vae_block_channels", ch, model_cfg.norm_groups)
    factor = 2 ** (len(ch) - 1)
    if model_cfg.resolution % factor:
        raise DpldmError(f"config: model.resolution={model_cfg.resolution} must be a multiple of the "
                         f"autoencoder's downsampling factor {factor}")
    return AutoencoderKL(
        in_channels=model_cfg.channels, out_channels=model_cfg.channels,
        down_block_types=("DownEncoderBlock2D",) * len(ch), up_block_types=("UpDecoderBlock2D",) * len(ch),
        block_out_channels=tuple(ch), layers_per_block=model_cfg.vae_layers_per_block,
        latent_channels=model_cfg.latent_channels, norm_num_groups=model_cfg.norm_groups,
        sample_size=model_cfg.resolution)


def build_unet(model_cfg, cross_attention_dim: int, latent_size: int,
               latent_channels: int | None = None) -> UNet2DConditionModel:
    """A cross-attention latent U-Net (GroupNorm only, no BatchNorm); `latent_channels` defaults to
    model.latent_channels (pass the VAE's when it differs)."""
    ch = list(model_cfg.unet_block_channels)
    attn = list(model_cfg.unet_attention)
    if len(attn) != len(ch):
        raise DpldmError(f"config: model.unet_attention has {len(attn)} entries; expected one per "
                         f"model.unet_block_channels level ({len(ch)})")
    _check_groups("unet_block_channels", ch, model_cfg.norm_groups)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    lc = latent_channels or model_cfg.latent_channels
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=lc, out_channels=lc,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(ch), layers_per_block=model_cfg.unet_layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=model_cfg.unet_attention_head_dim,
        norm_num_groups=model_cfg.norm_groups)


def build_scheduler(model_cfg) -> DDPMScheduler:
    """The training scheduler (Stable Diffusion's scaled-linear betas)."""
    return DDPMScheduler(num_train_timesteps=model_cfg.num_train_timesteps, beta_start=0.00085,
                         beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                         prediction_type=model_cfg.prediction_type)


def make_meta(model_cfg, source: str) -> dict:
    return {"class_names": list(model_cfg.class_names), "prompt_template": model_cfg.prompt_template,
            "resolution": model_cfg.resolution, "channels": model_cfg.channels, "source": source}


def build_components(model_cfg, vae=None, text=None, source: str = "built") -> Components:
    """A fresh pipeline from the config: `vae` (default: a new one) and `text` = (tokenizer, encoder)
    (default: model.text_encoder) are used as given; the U-Net is new."""
    vae = vae if vae is not None else build_vae(model_cfg)
    tokenizer, encoder = text if text is not None else load_text_encoder(model_cfg.text_encoder,
                                                                          model_cfg.max_text_length)
    unet = build_unet(model_cfg, encoder.config.hidden_size, latent_size(vae, model_cfg.resolution),
                      latent_channels=vae.config.latent_channels)
    meta = {**make_meta(model_cfg, source), "channels": vae.config.in_channels}
    return Components(vae, unet, encoder, tokenizer, build_scheduler(model_cfg), meta)


# ---------------------------------------------------------------------------------------------
# loading and saving

def _vae_class(vae_dir: Path):
    cfg_file = vae_dir / "config.json"
    if not cfg_file.is_file():
        raise DpldmError(f"{vae_dir}: missing config.json (expected a diffusers AutoencoderKL or VQModel)")
    name = json.loads(cfg_file.read_text()).get("_class_name", "AutoencoderKL")
    if name not in ("AutoencoderKL", "VQModel"):
        raise DpldmError(f"{cfg_file}: _class_name is {name}; expected AutoencoderKL or VQModel")
    return AutoencoderKL if name == "AutoencoderKL" else VQModel


def load_vae(vae_dir: str | Path, device: str = "cpu"):
    """A frozen AutoencoderKL/VQModel from a diffusers folder (bf16 on CUDA, fp32 on CPU)."""
    vae_dir = Path(vae_dir)
    if not vae_dir.is_dir():
        raise DpldmError(f"{vae_dir}: autoencoder folder does not exist")
    vae = _vae_class(vae_dir).from_pretrained(vae_dir)
    return _freeze(vae, device)


def _freeze(module, device: str):
    module.to(device)
    if str(device).startswith("cuda"):
        module.to(torch.bfloat16)
    module.eval().requires_grad_(False)
    return module


def _text_encoder_class(folder: Path):
    """The transformers class named in model_index.json (AutoModel when absent)."""
    index = folder / "model_index.json"
    if index.is_file():
        entry = json.loads(index.read_text()).get("text_encoder")
        if isinstance(entry, list) and len(entry) == 2 and hasattr(transformers, str(entry[1])):
            return getattr(transformers, entry[1])
    return transformers.AutoModel


def _unet_class(unet_dir: Path):
    """UNet2DConditionModel, or dpldm's AdaptedUNet2DConditionModel for exported LoDA U-Nets."""
    cfg_file = unet_dir / "config.json"
    name = json.loads(cfg_file.read_text()).get("_class_name") if cfg_file.is_file() else None
    if name == AdaptedUNet2DConditionModel.__name__:
        return AdaptedUNet2DConditionModel
    return UNet2DConditionModel


def load_pipeline(folder: str | Path, device: str = "cpu") -> Components:
    """Load an SD-layout pipeline folder: VAE and text encoder frozen (bf16 on CUDA), U-Net fp32 frozen
    (adapters make their own parameters trainable), scheduler as a DDPMScheduler for training."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DpldmError(f"{folder}: pipeline folder does not exist")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise DpldmError(f"{folder}: not a Stable-Diffusion-layout pipeline folder; missing "
                         f"{', '.join(p + '/' for p in missing)} (expected vae/, unet/, text_encoder/, "
                         f"tokenizer/, scheduler/)")
    try:
        vae = load_vae(folder / "vae", device)
        unet = _unet_class(folder / "unet").from_pretrained(folder / "unet").to(device).float()
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = _text_encoder_class(folder).from_pretrained(folder / "text_encoder")
    except (OSError, ValueError) as e:
        raise DpldmError(f"{folder}: cannot load pipeline part: {str(e).splitlines()[0]}") from None
    unet.requires_grad_(False)
    text_encoder = _freeze(text_encoder, device)
    check_tokenizer(tokenizer, str(folder / "tokenizer"))
    if (folder / "scheduler").is_dir():
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    else:
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    meta = {"class_names": [], "prompt_template": "{name}", "source": str(folder),
            "channels": vae.config.in_channels,
            "resolution": unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)}
    if (folder / META_FILE).is_file():
        try:
            meta.update(json.loads((folder / META_FILE).read_text()))
        except json.JSONDecodeError as e:
            raise DpldmError(f"{folder / META_FILE}: not valid JSON ({e.msg})") from None
    return Components(vae, unet, text_encoder, tokenizer, scheduler, meta)


def to_diffusers(components: Components):
    """A StableDiffusionPipeline over the same module objects (no copies)."""
    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def save_pipeline(components: Components, folder: str | Path) -> Path:
    """Write a plain-diffusers StableDiffusionPipeline folder (safetensors) + dpldm.json. An adapted (LoDA)
    U-Net writes its code into unet/ and model_index.json names it there, so diffusers loads the folder
    with trust_remote_code=True and without dpldm."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    halves = [(m, m.dtype) for m in (components.vae, components.text_encoder) if m.dtype != torch.float32]
    for m, _ in halves:              # frozen parts run in bf16 on CUDA; files stay fp32
        m.float()
    try:
        to_diffusers(components).save_pretrained(folder, safe_serialization=True)
    finally:
        for m, dtype in halves:
            m.to(dtype)
    if isinstance(components.unet, AdaptedUNet2DConditionModel):
        index = json.loads((folder / "model_index.json").read_text())
        index["unet"] = component_entry()
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / META_FILE).write_text(json.dumps(components.meta, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# prompts, images, latents

def class_prompts(class_names: list[str], template: str) -> list[str]:
    """One prompt per class: template with {name} (and {id}) filled in."""
    if "{name}" not in template and "{id}" not in template:
        raise DpldmError(f"config: model.prompt_template {template!r} must contain {{name}} or {{id}}")
    return [template.format(name=n, id=i) for i, n in enumerate(class_names)]


@torch.no_grad()
def encode_prompts(components_or_pair, prompts: list[str]) -> torch.Tensor:
    """[B, L, D] float32 prompt embeddings, computed as StableDiffusionPipeline.encode_prompt does
    (max-length padding, attention mask only if the encoder's config asks for it, last hidden state)."""
    if isinstance(components_or_pair, Components):
        tokenizer, encoder = components_or_pair.tokenizer, components_or_pair.text_encoder
    else:
        tokenizer, encoder = components_or_pair
    device = next(encoder.parameters()).device
    tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = tok.attention_mask.to(device)
    out = encoder(tok.input_ids.to(device), attention_mask=mask)[0]
    return out.float()


def _scale_shift(vae) -> tuple[float, float]:
    scale = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(scale), float(shift)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] → (mean, std) of scaled latents (float32); std is zero for a VQModel."""
    scale, shift = _scale_shift(vae)
    x = pixels.to(device=vae.device, dtype=vae.dtype)
    if isinstance(vae, VQModel):
        mean = vae.encode(x).latents.float()
        std = torch.zeros_like(mean)
    else:
        dist = vae.encode(x).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    return (mean - shift) * scale, std * scale


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → pixels in [-1, 1] (float32)."""
    scale, shift = _scale_shift(vae)
    z = latents.to(device=vae.device, dtype=vae.dtype) / scale + shift
    return vae.decode(z).sample.float().clamp(-1, 1)


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_size(vae, resolution: int) -> int:
    """Latent side length for `resolution` pixels; error if not a multiple of the VAE factor."""
    f = vae_factor(vae)
    if resolution % f:
        raise DpldmError(f"resolution {resolution} must be a multiple of the autoencoder's factor {f}")
    return resolution // f
