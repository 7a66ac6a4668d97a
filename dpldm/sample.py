"""`dpldm sample RUN`: class- or text-conditioned generation with classifier-free guidance.

Generation runs through diffusers' StableDiffusionPipeline built from the run's components (the frozen
VAE and text encoder, the U-Net with the run's adapter) and a diffusers scheduler (DDIM, DPM-Solver++,
Euler). Image i always uses the generator seeded by (seed, i), so output does not depend on batch size
or on how many ranks share the work (rank r makes images i ≡ r mod world_size).
Writes PNGs, grid.png and webdataset shards (`.png` + `.cls` and/or `.txt` + `.json`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm

from dpldm.config import Config, load_config
from dpldm.data.images import encode_image
from dpldm.data.shards import ShardWriter
from dpldm.distributed.env import barrier, init_distributed
from dpldm.errors import DpldmError
from dpldm.log import log
from dpldm.models.adapters import load_adapter
from dpldm.models.pipeline import class_prompts, encode_prompts, load_pipeline
from dpldm.precision import autocast, resolve
from dpldm.rng import RunRandomness
from dpldm.run_dir import SAMPLES_META, RunDir

SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}


@dataclass
class Loaded:
    comps: object
    cfg: Config | None
    meta: dict


def load_run(path: str | Path, device: str = "cpu") -> Loaded:
    """A fine-tune run dir (config.yaml + adapter/), a pretrain run dir (pipeline/), or a pipeline folder."""
    path = Path(path)
    run = RunDir(path)
    if (path / "model_index.json").exists():
        comps = load_pipeline(path, device=device)
        return Loaded(comps, None, dict(getattr(comps, "meta", {}) or {}))
    if (path / "pipeline" / "model_index.json").exists():
        comps = load_pipeline(path / "pipeline", device=device)
        cfg = load_config(run.config) if run.config.exists() else None
        return Loaded(comps, cfg, dict(getattr(comps, "meta", {}) or {}))
    if not run.config.exists():
        raise DpldmError(f"{path}: not a run directory (no config.yaml) nor a pipeline folder (no model_index.json)")
    cfg = load_config(run.config)
    comps = load_pipeline(cfg.model.pretrained, device=device)
    if run.adapter.exists():
        load_adapter(comps.unet, run.adapter)
        comps.unet.to(device)
    comps.unet.eval()
    meta = dict(getattr(comps, "meta", {}) or {})
    if run.classes.exists():  # the fine-tune's own class prompts override the pipeline's
        meta.update(json.loads(run.classes.read_text()))
    return Loaded(comps, cfg, meta)


def make_pipeline(comps, scheduler: str):
    sched = getattr(diffusers, SCHEDULERS[scheduler]).from_config(comps.scheduler.config)
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plan_prompts(meta: dict, cfg: Config | None, n: int, class_id: int | None, prompt: str | None,
                 prompts_file: str | None) -> tuple[list[str], list[int]]:
    """Prompts and labels (-1 for free text) of the n images: balanced over classes by default."""
    if prompt is not None:
        return [prompt] * n, [-1] * n
    if prompts_file:
        lines = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        if not lines:
            raise DpldmError(f"{prompts_file}: no prompts (one per line expected)")
        return [lines[i % len(lines)] for i in range(n)], [-1] * n
    names = list(meta.get("class_names") or (cfg.model.class_names if cfg else []))
    if not names:
        raise DpldmError("the model names no classes (dpldm.json class_names): pass --prompt or --prompts-file")
    template = meta.get("prompt_template") or (cfg.model.prompt_template if cfg else "{name}")
    table = class_prompts(names, template)
    if class_id is not None:
        if not 0 <= class_id < len(names):
            raise DpldmError(f"--class {class_id}: the model has classes 0..{len(names) - 1}")
        return [table[class_id]] * n, [class_id] * n
    labels = [i % len(names) for i in range(n)]
    return [table[k] for k in labels], labels


@torch.no_grad()
def generate(comps, prompts: list[str], indices: list[int], *, guidance: float, steps: int, scheduler: str,
             seed: int, batch_size: int, resolution: int, precision: str = "fp32") -> torch.Tensor:
    """Images [len(indices), C, H, W] in [0, 1]; image i uses the generator seeded with (seed, i); the U-Net and
    the decoder run at `precision` (dpldm/precision.py: bf16 autocast or fp32)."""
    if comps.vae.dtype != comps.unet.dtype:  # frozen parts are bf16 on CUDA; the pipeline decodes U-Net-dtype latents
        comps.vae.to(comps.unet.dtype)
    pipe = make_pipeline(comps, scheduler)
    factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    if resolution % factor or resolution % 8:
        raise DpldmError(f"resolution {resolution} must be a multiple of 8 and of the autoencoder factor {factor}")
    null = encode_prompts(comps, [""])
    rng = RunRandomness(seed)   # the sampling seed is public: samples are post-processing of the DP model
    out = []
    for s in tqdm(range(0, len(indices), batch_size), desc="sample", unit="batch", leave=False):
        idx = indices[s:s + batch_size]
        batch = [prompts[i] for i in idx]
        unique = list(dict.fromkeys(batch))   # class prompts repeat: encode each once per batch (~25x less text work)
        table = dict(zip(unique, encode_prompts(comps, unique)))
        cond = torch.stack([table[p] for p in batch])
        gens = [rng.torch("sample", i) for i in idx]
        with autocast(precision, comps.unet.device.type):
            images = pipe(prompt_embeds=cond, negative_prompt_embeds=null.expand_as(cond), num_inference_steps=steps,
                          guidance_scale=guidance, generator=gens, height=resolution, width=resolution,
                          output_type="pt").images
        out.append(images.float().cpu().clamp(0, 1))
    return torch.cat(out) if out else torch.zeros(0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    if len(images) == 0:
        return
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    grid = make_grid(images[:256], nrow=nrow, padding=2, pad_value=1.0)
    Image.fromarray(to_uint8(grid[None])[0]).save(path)


def write_outputs(images: torch.Tensor, indices: list[int], prompts: list[str], labels: list[int], out: Path,
                  rank: int = 0) -> None:
    """PNGs in out/images and webdataset shards in out/shards (`.png` + `.cls` or `.txt` + `.json`)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    arrays = to_uint8(images)
    with ShardWriter(out / "shards", f"shard-r{rank:03d}-%06d.tar", maxcount=10000) as sink:
        for arr, i in zip(arrays, indices):
            png = encode_image(arr, "png")           # encoded once, for the file and the shard
            (out / "images" / f"{i:06d}.png").write_bytes(png)
            labelled = labels[i] >= 0
            sink.write(f"{i:08d}", png, label=labels[i] if labelled else None,
                       text=None if labelled else prompts[i],
                       meta={"prompt": prompts[i], "label": labels[i], "index": i})


def sample_run(run: str | Path, out: str | Path | None = None, *, n: int | None = None, class_id: int | None = None,
               prompt: str | None = None, prompts_file: str | None = None, guidance: float | None = None,
               steps: int | None = None, scheduler: str | None = None, seed: int | None = None,
               batch_size: int | None = None, resolution: int | None = None, precision: str | None = None) -> Path:
    env = init_distributed()
    device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    loaded = load_run(run, device)
    sc = loaded.cfg.sample if loaded.cfg else Config().sample
    n = n if n is not None else sc.n
    res = resolution or sc.resolution or loaded.meta.get("resolution") or \
        (loaded.cfg.model.resolution if loaded.cfg else loaded.comps.vae.config.sample_size)
    prompts, labels = plan_prompts(loaded.meta, loaded.cfg, n, class_id, prompt, prompts_file)
    indices = list(range(env.rank, n, env.world_size))
    settings = {"guidance": sc.guidance if guidance is None else guidance, "steps": steps or sc.steps,
                "scheduler": scheduler or sc.scheduler, "seed": sc.seed if seed is None else seed,
                "precision": precision or sc.precision}
    used = resolve(settings["precision"], device.split(":")[0])
    if env.is_main:
        log(f"sample: {n} images, {settings['steps']} {settings['scheduler']} steps, "
            f"guidance {settings['guidance']:g}, {used} (sample.precision={settings['precision']})")
    images = generate(loaded.comps, prompts, indices, batch_size=batch_size or sc.batch_size,
                      resolution=int(res), **{**settings, "precision": used})
    out = Path(out) if out else Path(run) / "samples"
    write_outputs(images, indices, prompts, labels, out, env.rank)
    if env.is_main:
        save_grid(images[:100], out / "grid.png", nrow=10 if labels[0] >= 0 else None)
        (out / SAMPLES_META).write_text(json.dumps({"n": n, "resolution": int(res), **settings,
                                                      "dtype": used,
                                                      "labels": labels[:n], "run": str(run)}, indent=2))
        log(f"sample: wrote {n} images to {out} (grid {out / 'grid.png'})")
    barrier()
    return out


def main(args) -> int:
    sample_run(args.run, args.out or None, n=args.n, class_id=args.class_id, prompt=args.prompt,
               prompts_file=args.prompts_file, guidance=args.guidance, steps=args.steps, scheduler=args.scheduler,
               seed=args.seed, batch_size=args.batch_size, resolution=args.resolution, precision=args.precision)
    return 0
