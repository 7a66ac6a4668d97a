"""The private set (or a public pretraining set), encoded once by the frozen autoencoder into a random-access
latent cache.

Layout of a cache directory (memory-mapped .npy, so exact Poisson sampling reads any subset cheaply):
    latents.npy       float32 [N, C, h, w]  posterior means, already scaled by the VAE's scaling factor
    latents_std.npy   float32 [N, C, h, w]  posterior stds (scaled likewise)
    latents_flip.npy  float32 [N, C, h, w]  means of the horizontally flipped images (data.flip only):
                      a second *view of the same example*, never a separate example — an extra record
                      would let one person's image count twice and double the sensitivity
    labels.npy        int64   [N]           class ids (-1 when the shards carry none)
    texts.json        list[str] (N)         captions ("" when none)
    keys.json         list[str] (N)         webdataset keys (for audits and error messages)
    meta.json         N, shapes, source, encoder identity (hash of the VAE's config and weights), flip
A cache whose encoder identity or source differs from the current config is stale and is rebuilt.
Every private example must be encoded: a bad sample stops encoding (dropping it would change N).
A class-conditional set (some examples labelled, no captions) must label every example: one unlabeled
example fails the build (and the load of an older cache), never the training step that samples it — a
crash at a data-dependent step would reveal a membership event (issue 11 §7).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dpldm.config import Config, load_config
from dpldm.data.shards import check_complete
from dpldm.data.stream import stream_loader
from dpldm.distributed.env import barrier
from dpldm.errors import DpldmError
from dpldm.log import log
from dpldm.models.pipeline import encode_images, load_pipeline

FORMAT_VERSION = 1


def encoder_identity(vae) -> str:
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_dir_for(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output.dir) / "latent_cache"


class LatentCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise DpldmError(f"latent cache {self.path}: no meta.json (run `dpldm encode CONFIG` first)")
        self.meta = json.loads(meta_file.read_text())
        self.latents = np.load(self.path / "latents.npy", mmap_mode="r")
        self.stds = np.load(self.path / "latents_std.npy", mmap_mode="r")
        flip_file = self.path / "latents_flip.npy"
        self.flipped = np.load(flip_file, mmap_mode="r") if flip_file.exists() else None
        self.labels = np.load(self.path / "labels.npy")
        self.texts = json.loads((self.path / "texts.json").read_text())
        if len(self.latents) != self.meta["n"] or len(self.labels) != self.meta["n"]:
            raise DpldmError(f"latent cache {self.path}: arrays disagree with meta.json n={self.meta['n']}")
        check_labels(self.labels, self.texts, None, f"latent cache {self.path}")

    def __len__(self) -> int:
        return int(self.meta["n"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["latent_shape"])

    def get(self, indices: np.ndarray, flip: np.ndarray | None = None) -> dict:
        """Latents, labels and texts of `indices`; `flip[i]` picks example i's flipped view."""
        idx = np.asarray(indices, dtype=np.int64)
        lat = np.array(self.latents[idx], dtype=np.float32)
        if flip is not None and self.flipped is not None and np.any(flip):
            lat[flip] = self.flipped[idx[flip]]
        return {"latents": torch.from_numpy(lat),
                "labels": torch.from_numpy(self.labels[idx]).long(),
                "texts": [self.texts[i] for i in idx]}


def check_labels(labels: np.ndarray, texts: list[str], keys: list[str] | None, where: str) -> None:
    """DpldmError when a class-conditional set (labels present, no captions) has an unlabeled example."""
    missing = np.flatnonzero(np.asarray(labels) < 0)
    if len(missing) == 0 or len(missing) == len(labels) or any(texts):
        return
    first = f"key {keys[missing[0]]!r}" if keys else f"index {int(missing[0])}"
    raise DpldmError(f"data.private: {len(missing)} of {len(labels)} examples in {where} have no label (first: "
                     f"{first}) although the set is class-conditional; label or remove them and re-pack")


def is_fresh(path: Path, cfg: Config, identity: str) -> bool:
    meta_file = path / "meta.json"
    if not meta_file.exists():
        return False
    meta = json.loads(meta_file.read_text())
    return (meta.get("version") == FORMAT_VERSION and meta.get("source") == cfg.data.private
            and meta.get("encoder") == identity and meta.get("flip") == cfg.data.flip
            and meta.get("limit") == cfg.data.limit and meta.get("resolution") == cfg.model.resolution)


def public_data_cfg(cfg: Config) -> Config:
    """cfg with data.private = data.public, no flip and no limit: what ensure_cache(public=True) encodes."""
    return replace(cfg, data=replace(cfg.data, private=cfg.data.public, flip=False, limit=0))


@torch.no_grad()
def build_cache(cfg: Config, vae, path: Path, log=log, public: bool = False) -> LatentCache:
    """Stream data.private (public=True: data.public, whose bad samples are skipped as in streaming, and
    which no manifest must match) once through the frozen VAE (single process) into `path`."""
    if public:
        cfg = public_data_cfg(cfg)
    what = "public" if public else "private"
    if not cfg.data.private:
        raise DpldmError(f"data.{what}: no {what} shards configured (set data.{what}=DIR)")
    identity = encoder_identity(vae)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    means, stds, flips, labels, texts, keys = [], [], [], [], [], []
    data_cfg = replace(cfg.data, num_workers=0)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    t0, n = time.time(), 0
    for batch in stream_loader(cfg.data.private, data_cfg, cfg.model.resolution, cfg.model.channels,
                               batch_size=64, private=not public, world_size=1, seed=0, shuffle=False):
        pixels = batch["pixels"].to(device, dtype)
        mean, std = encode_images(vae, pixels)
        means.append(mean.float().cpu().numpy())
        stds.append(std.float().cpu().numpy())
        if cfg.data.flip:
            flips.append(encode_images(vae, pixels.flip(-1))[0].float().cpu().numpy())
        labels.append(batch["label"].numpy().astype(np.int64))
        texts.extend(batch["text"])
        keys.extend(batch["key"])
        n += len(batch["key"])
        if cfg.data.limit and n >= cfg.data.limit:
            break
        if n % 2048 < 64:
            log(f"encode: {n} {what} examples ({n / (time.time() - t0):.0f}/s)")
    if not means:
        raise DpldmError(f"data.{what}: no samples found in {cfg.data.private}")
    if not cfg.data.limit and not public:
        check_complete(cfg.data.private, n, log=log)     # every private example the manifest counts, or stop
    n_keep = min(n, cfg.data.limit) if cfg.data.limit else n
    lat, sd, lab = (np.concatenate(a)[:n_keep] for a in (means, stds, labels))
    texts, keys = texts[:n_keep], keys[:n_keep]
    if not public:
        check_labels(lab, texts, keys, cfg.data.private)    # the whole set, before anything is written
    if cfg.data.flip:
        np.save(tmp / "latents_flip.npy", np.concatenate(flips)[:n_keep])
    np.save(tmp / "latents.npy", lat)
    np.save(tmp / "latents_std.npy", sd)
    np.save(tmp / "labels.npy", lab)
    (tmp / "texts.json").write_text(json.dumps(texts))
    (tmp / "keys.json").write_text(json.dumps(keys))
    meta = {"version": FORMAT_VERSION, "n": int(len(lat)), "latent_shape": list(lat.shape[1:]),
            "source": cfg.data.private, "encoder": identity, "flip": cfg.data.flip, "limit": cfg.data.limit,
            "resolution": cfg.model.resolution, "channels": cfg.model.channels,
            "labels_present": bool((lab >= 0).any()), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    log(f"encode: wrote {meta['n']} latents {tuple(meta['latent_shape'])} to {path} "
        f"in {time.time() - t0:.1f}s")
    return LatentCache(path)


def ensure_cache(cfg: Config, vae, env=None, log=log, path: Path | None = None, public: bool = False) -> LatentCache:
    """Reuse a fresh cache of data.private (public=True: data.public) at `path` (default cache_dir_for(cfg));
    otherwise rank 0 encodes while the other ranks wait. Rank 0 alone decides whether to encode and every rank
    takes the same barrier: a rank that looked later would see rank 0's new cache as fresh, skip the barrier
    and enter the next collective alone (a two-node SLURM job hung so in CI)."""
    path = path or cache_dir_for(cfg)
    if (env is None or env.is_main) and not is_fresh(path, public_data_cfg(cfg) if public else cfg,
                                                      encoder_identity(vae)):
        if path.exists():
            log(f"encode: cache {path} is stale (encoder, source or settings changed): rebuilding")
        build_cache(cfg, vae, path, log=log, public=public)
    barrier()
    return LatentCache(path)


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if not cfg.model.pretrained:
        raise DpldmError("model.pretrained: set it to the pipeline folder whose autoencoder encodes the data")
    comps = load_pipeline(cfg.model.pretrained)
    cache = ensure_cache(cfg, comps.vae)
    print(json.dumps({"cache": str(cache.path), "n": len(cache), "latent_shape": list(cache.latent_shape)}))
    return 0
