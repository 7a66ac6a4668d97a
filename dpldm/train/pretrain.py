"""`dpldm pretrain autoencoder|unet CONFIG [overrides]`: public (non-private) pretraining, streamed.

- autoencoder: a KL autoencoder (build_vae) trained with L1 reconstruction + a small KL term
  (Stable Diffusion's ratio); writes `<output.dir>/vae/` (diffusers AutoencoderKL) at every
  checkpoint with `scaling_factor` = 1 / std of latents measured on data, plus a reconstruction grid.
- unet: a cross-attention latent U-Net (build_unet) on the frozen autoencoder (`model.vae`) and the
  frozen text encoder (`model.text_encoder`); epsilon/v prediction with the DDPM schedule, null-prompt
  dropout `model.cond_dropout`, EMA of the weights; writes `<output.dir>/pipeline/` (EMA weights,
  plain diffusers StableDiffusionPipeline + dpldm.json) and a sample grid at every checkpoint. With
  `data.public_latents` the public set is encoded once into `<output.dir>/unet/latent_cache` and batches are
  drawn from it (the frozen autoencoder's encode no longer runs every step).
Checkpoints live in `<output.dir>/<autoencoder|unet>/checkpoints/`; re-run the same command to resume
(the stream restarts at the saved epoch). `data.batch_size` is the global batch (split over ranks).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from dpldm.config import Config, load_config, save_config
from dpldm.data.images import from_float_chw, make_grid
from dpldm.data.latent_cache import LatentCache, ensure_cache
from dpldm.data.shards import count_samples
from dpldm.data.stream import stream_loader
from dpldm.distributed.env import init_distributed
from dpldm.errors import DpldmError
from dpldm.log import log
from dpldm.models import pipeline as P
from dpldm.models.diffusion_loss import diffusion_loss
from dpldm.models.ema import EMA
from dpldm.models.text_encoders import load_text_encoder
from dpldm.rng import RunRandomness
from dpldm.run_dir import RunDir
from dpldm.train.trainer import Trainer, public_seed

KL_WEIGHT = 1e-6          # on the per-example KL sum, relative to the per-example L1 sum (as SD's VAE)
SCALE_SAMPLES = 512       # images used to measure the latent scaling factor
GRID_IMAGES = 16


# -- losses and measurements (pure functions, tested directly) ----------------------------------

def autoencoder_loss(vae, pixels: torch.Tensor, kl_weight: float = KL_WEIGHT) -> tuple[torch.Tensor, dict]:
    """Mean over the batch of L1 reconstruction + kl_weight·KL, both as per-pixel means."""
    dist = vae.encode(pixels).latent_dist
    recon = vae.decode(dist.sample()).sample
    l1 = (recon - pixels).abs().flatten(1).mean(1)
    kl = dist.kl() / pixels[0].numel()
    loss = (l1 + kl_weight * kl).mean()
    return loss, {"l1": l1.mean().item(), "kl": kl.mean().item()}


@torch.no_grad()
def measure_scaling_factor(vae, batches, max_images: int = SCALE_SAMPLES) -> float:
    """1 / std of sampled latents over up to `max_images` images (Stable Diffusion's 0.18215 recipe)."""
    zs, n = [], 0
    for pixels in batches:
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        zs.append(dist.sample().float().flatten())
        n += len(pixels)
        if n >= max_images:
            break
    if not zs:
        raise DpldmError("data.public: no images to measure the latent scaling factor on")
    std = torch.cat(zs).std().item()
    return 1.0 / max(std, 1e-8)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(from_float_chw(x)) for x in pixels.detach().float().cpu().numpy()]


# -- data ---------------------------------------------------------------------------------------

class PublicBatches:
    """Endless iterator of `data.public` batches for this rank; `epoch` is kept for resume."""

    def __init__(self, cfg: Config, env, resolution: int, channels: int):
        if not cfg.data.public:
            raise DpldmError("config: data.public must name the public shards to pretrain on")
        if cfg.data.batch_size % env.world_size:
            raise DpldmError(f"config: data.batch_size={cfg.data.batch_size} must be divisible by the "
                             f"number of processes ({env.world_size})")
        self.cfg, self.env, self.epoch = cfg, env, 0
        self._open = lambda epoch: stream_loader(
            cfg.data.public, cfg.data, resolution, channels, batch_size=cfg.data.batch_size // env.world_size,
            rank=env.rank, world_size=env.world_size, epoch=epoch, seed=public_seed(cfg))
        self._it = None

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self._open(self.epoch))
            try:
                return next(self._it)
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1
        raise DpldmError(f"data.public {self.cfg.data.public}: no readable samples for rank {self.env.rank}")

    def pixels_only(self):
        """A fresh, unshuffled-order pass over epoch 0 (for measurements)."""
        for b in self._open(0):
            yield b["pixels"]


class CachedPublicBatches:
    """Endless batches of this rank from a latent cache of data.public (data.public_latents): epoch e visits the
    permutation seeded by (public seed, e) in whole global batches; `epoch` and `pos` (batches done in it) make
    the resume exact. Yields the posterior's scaled "mean" and "std" instead of "pixels"."""

    def __init__(self, cache: LatentCache, cfg: Config, env):
        if len(cache) < cfg.data.batch_size:
            raise DpldmError(f"data.public {cfg.data.public}: {len(cache)} samples, fewer than one batch "
                             f"(data.batch_size={cfg.data.batch_size})")
        self.cache, self.env, self.seed, self.batch = cache, env, public_seed(cfg), cfg.data.batch_size
        self.epoch, self.pos, self._order = 0, 0, (-1, None)

    def __next__(self) -> dict:
        if self.pos >= len(self.cache) // self.batch:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.cache)))
        idx = np.sort(self._order[1][self.pos * self.batch:(self.pos + 1) * self.batch][self.env.rank::
                                                                                      self.env.world_size])
        self.pos += 1
        got = self.cache.get(idx)
        return {"mean": got["latents"], "std": torch.from_numpy(np.array(self.cache.stds[idx], dtype=np.float32)),
                "label": got["labels"], "text": got["texts"], "key": [f"latent cache index {i}" for i in idx]}


def condition_prompts(labels: list[int], texts: list[str], class_names: list[str], template: str,
                      keys: list[str] | None = None) -> list[str]:
    """The prompt of each example: its class prompt when labelled, else its caption, else ""."""
    if any(k >= 0 for k in labels):
        if any(k < 0 for k in labels):
            key = keys[labels.index(-1)] if keys else "?"
            raise DpldmError(f"data.public: a batch mixes labelled and unlabelled samples (key {key})")
        if max(labels) >= len(class_names):
            raise DpldmError(f"data.public: label {max(labels)} but model.class_names has {len(class_names)} names")
        return [template.format(name=class_names[k], id=k) for k in labels]
    return list(texts) if any(texts) else [""] * len(labels)


def total_steps(cfg: Config) -> int:
    if cfg.train.steps > 0:
        return cfg.train.steps
    if cfg.train.epochs > 0:
        return max(1, math.ceil(count_samples(cfg.data.public) * cfg.train.epochs / cfg.data.batch_size))
    raise DpldmError("config: train.steps (or train.epochs) must be > 0")


# -- trainers -----------------------------------------------------------------------------------

class AutoencoderTrainer(Trainer):
    def __init__(self, cfg: Config, run_dir: Path, env, device):
        self.vae = P.build_vae(cfg.model).to(device).train()
        super().__init__(cfg, run_dir, self.vae, dict(self.vae.named_parameters()), total_steps(cfg), env)
        self.device = device
        self.data = PublicBatches(cfg, env, cfg.model.resolution, cfg.model.channels)
        self.out_dir = Path(cfg.output.dir) / "vae"
        self.history: list[float] = []

    def train_step(self, step: int) -> dict:
        pixels = next(self.data)["pixels"].to(self.device)
        loss, parts = autoencoder_loss(self.vae, pixels)
        self.engine.backward(loss)
        self.engine.step()
        self.history.append(loss.item())
        return {"loss": loss.item(), "samples": len(pixels) * self.env.world_size, **parts}

    def extra_state(self) -> dict:
        return {"epoch": self.data.epoch}

    def load_extra_state(self, state: dict) -> None:
        self.data.epoch = int(state.get("epoch", 0))

    def on_checkpoint(self, step: int) -> None:
        if not self.env.is_main:
            return
        self.vae.eval()
        scale = measure_scaling_factor(self.vae, self.data.pixels_only())
        self.vae.register_to_config(scaling_factor=scale)
        self.vae.save_pretrained(self.out_dir, safe_serialization=True)
        x = next(iter(self.data.pixels_only()))[:GRID_IMAGES // 2].to(self.device)
        recon = P.decode_latents(self.vae, P.encode_images(self.vae, x)[0])
        grid_dir = self.run_dir / "samples"
        grid_dir.mkdir(parents=True, exist_ok=True)
        make_grid(to_images(x) + to_images(recon), columns=len(x)).save(grid_dir / f"step-{step:08d}.png")
        self.vae.train()
        log(f"autoencoder: wrote {self.out_dir} (scaling_factor {scale:.4f})")


def _vae_folder(spec: str) -> Path:
    if not spec:
        raise DpldmError("config: model.vae must name the autoencoder folder (`dpldm pretrain autoencoder` "
                         "writes <output.dir>/vae)")
    path = Path(spec)
    return path / "vae" if (path / "vae" / "config.json").is_file() else path


class UNetTrainer(Trainer):
    def __init__(self, cfg: Config, run_dir: Path, env, device):
        vae = P.load_vae(_vae_folder(cfg.model.vae), str(device))
        tokenizer, encoder = load_text_encoder(cfg.model.text_encoder, cfg.model.max_text_length)
        self.comps = P.build_components(cfg.model, vae=vae, text=(tokenizer, encoder.to(device)),
                                        source=f"dpldm pretrain unet ({cfg.data.public})")
        unet = self.comps.unet.to(device).train().requires_grad_(True)
        super().__init__(cfg, run_dir, unet, dict(unet.named_parameters()), total_steps(cfg), env)
        self.device, self.unet = device, unet
        if cfg.data.public_latents:
            cache = ensure_cache(cfg, vae, env, path=Path(run_dir) / "latent_cache", public=True)
            self.data = CachedPublicBatches(cache, cfg, env)
        else:
            self.data = PublicBatches(cfg, env, cfg.model.resolution, vae.config.in_channels)
        self.ema = EMA(unet, cfg.model.ema_decay)
        self.alphas = self.comps.scheduler.alphas_cumprod.to(device)
        self.null = P.encode_prompts(self.comps, [""])[0]
        self.class_names = list(cfg.model.class_names)
        self.template = cfg.model.prompt_template
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.max_label = -1
        self.out_dir = Path(cfg.output.dir) / "pipeline"
        self.history: list[float] = []

    def prompts_for(self, batch: dict) -> list[str]:
        labels = batch["label"].tolist()
        if labels and max(labels) >= 0:
            self.max_label = max(self.max_label, max(labels))
        names = self.class_names or [str(i) for i in range(self.max_label + 1)]
        return condition_prompts(labels, list(batch["text"]), names, self.template, batch["key"])

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings, cached per distinct prompt (class prompts repeat every step)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if len(self._prompt_cache) + len(missing) > 4096:
            return P.encode_prompts(self.comps, prompts)
        if missing:
            self._prompt_cache.update(zip(missing, P.encode_prompts(self.comps, missing)))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def train_step(self, step: int) -> dict:
        batch = next(self.data)
        if "pixels" in batch:
            mean, std = P.encode_images(self.comps.vae, batch["pixels"].to(self.device))
        else:
            mean, std = batch["mean"].to(self.device), batch["std"].to(self.device)
        x0 = mean + std * torch.randn_like(mean)
        cond = self.encode(self.prompts_for(batch)).to(self.device)
        drop = torch.rand(len(x0)) < self.cfg.model.cond_dropout
        cond = torch.where(drop.to(self.device)[:, None, None], self.null.expand_as(cond), cond)
        t = torch.randint(0, len(self.alphas), (len(x0), 1))
        noise = torch.randn(len(x0), 1, *x0.shape[1:])
        call = lambda x, tt, c: self.unet(x, tt, encoder_hidden_states=c).sample  # noqa: E731
        loss = diffusion_loss(call, self.alphas, x0, cond, t.to(self.device), noise.to(self.device),
                              self.cfg.model.prediction_type).mean()
        self.engine.backward(loss)
        self.engine.step()
        self.ema.update(self.unet)
        every = self.cfg.train.sample_every
        if every and (step + 1) % every == 0 and self.env.is_main:
            self.write_grid(step + 1, self.ema_components())
        self.history.append(loss.item())
        return {"loss": loss.item(), "samples": len(x0) * self.env.world_size}

    def extra_state(self) -> dict:
        return {"epoch": self.data.epoch, "pos": getattr(self.data, "pos", 0), "max_label": self.max_label}

    def load_extra_state(self, state: dict) -> None:
        self.data.epoch, self.max_label = int(state.get("epoch", 0)), int(state.get("max_label", -1))
        if isinstance(self.data, CachedPublicBatches):
            self.data.pos = int(state.get("pos", 0))
        ema_file = self.latest_checkpoint() / "ema.safetensors"
        if ema_file.is_file():
            self.ema.load_state_dict(load_file(str(ema_file)))
        else:
            log(f"{ema_file} missing: EMA restarts from the current weights")
            self.ema = EMA(self.unet, self.cfg.model.ema_decay)

    def ema_components(self) -> P.Components:
        unet = self.ema.copy_to(copy.deepcopy(self.unet)).eval().requires_grad_(False)
        meta = dict(self.comps.meta)
        names = self.class_names or ([str(i) for i in range(self.max_label + 1)] if self.max_label >= 0 else [])
        meta.update(class_names=names, prompt_template=self.template)
        return P.Components(self.comps.vae, unet, self.comps.text_encoder, self.comps.tokenizer,
                            self.comps.scheduler, meta)

    def write_grid(self, step: int, comps: P.Components) -> Path:

        names = comps.meta["class_names"][:10]
        prompts = P.class_prompts(names, self.template) if names else [""]
        prompts = prompts * math.ceil(GRID_IMAGES / len(prompts))      # one column per class
        pipe = P.to_diffusers(comps)
        pipe.scheduler = DDIMScheduler.from_config(comps.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            images = pipe(prompts, num_inference_steps=self.cfg.sample.steps,
                          guidance_scale=self.cfg.sample.guidance, output_type="pil",
                          generator=RunRandomness(public_seed(self.cfg)).torch("grid")).images
        path = self.run_dir / "samples" / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, columns=len(names) or 0).save(path)
        return path

    def write_checkpoint_files(self, folder: Path) -> None:
        save_file(self.ema.state_dict(), str(folder / "ema.safetensors"))   # inside the checkpoint, before its rename

    def on_checkpoint(self, step: int) -> None:
        if not self.env.is_main:
            return
        comps = self.ema_components()
        P.save_pipeline(comps, self.out_dir)
        self.write_grid(step, comps)
        log(f"unet: wrote {self.out_dir} (EMA weights)")


def run_pretrain(cfg: Config, what: str) -> Trainer:
    """Train (or resume) and return the trainer; its `out_dir` holds the result, `history` the losses."""
    env = init_distributed(cfg.distributed.backend)
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    run_dir = Path(cfg.output.dir) / what
    if env.is_main:
        save_config(cfg, RunDir(run_dir).config)
    cls = AutoencoderTrainer if what == "autoencoder" else UNetTrainer
    rng = RunRandomness(public_seed(cfg))
    torch.manual_seed(rng.int_seed("init"))                # same initial weights on every rank
    trainer = cls(cfg, run_dir, env, device)
    torch.manual_seed(rng.int_seed("train", env.rank))     # different noise/dropout draws per rank
    log(f"pretrain {what}: {sum(p.numel() for p in trainer.trainable.values()):,} trainable parameters, "
        f"{trainer.total_steps} steps, run dir {run_dir}")
    trainer.fit()
    return trainer


def main(args) -> int:
    if args.what not in ("autoencoder", "unet"):
        raise DpldmError(f"pretrain: expected autoencoder or unet; got {args.what!r}")
    cfg = load_config(args.config, args.overrides)
    trainer = run_pretrain(cfg, args.what)
    log(f"dpldm pretrain {args.what}: done; wrote {trainer.out_dir}")
    return 0
