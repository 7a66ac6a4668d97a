"""Image helpers shared by the shard layer, packing and inspection: encode/decode bytes, bring an image to a
resolution and channel count, convert to the [-1, 1] float tensors the models use, draw grids."""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from dpldm.errors import DpldmError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
TRANSFORMS = ("resize", "center_crop", "pad")


def encode_image(img: Image.Image | np.ndarray, fmt: str) -> bytes:
    """PNG or JPEG bytes of a PIL image or a uint8 array ([H,W] gray, [H,W,3] RGB, [H,W,4] RGBA)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img))
    if fmt == "png":
        if img.mode not in ("1", "L", "LA", "RGB", "RGBA", "I;16", "I", "P"):
            img = img.convert("RGBA" if "A" in img.mode else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)  # small images pad to 512 B in a tar anyway
        return buf.getvalue()
    if fmt in ("jpg", "jpeg"):
        if img.mode not in ("L", "RGB"):
            img = img.convert("L" if img.mode in ("1", "I;16", "I", "LA") else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    raise DpldmError(f"image format must be png or jpg; got {fmt!r}")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (raises on truncated or garbage data)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def convert_channels(img: Image.Image, channels: int) -> Image.Image:
    """Gray→RGB by repetition, RGB→gray by luminance (ITU-R 601), alpha dropped; 4 needs alpha."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if channels == 1:
        return img if mode == "L" else img.convert("L")
    if channels == 3:
        return img if mode == "RGB" else img.convert("RGB")
    if channels == 4:
        if "A" not in mode:
            raise DpldmError(f"cannot make 4 channels (RGBA) from a {mode} image without alpha; use channels 1 or 3")
        return img.convert("RGBA")
    raise DpldmError(f"channels must be 1 (gray), 3 (RGB) or 4 (RGBA); got {channels}")


def fit_resolution(img: Image.Image, resolution: int, transform: str) -> Image.Image:
    """Bring an image to resolution×resolution.

    resize: stretch both sides; center_crop: scale the short side to `resolution`, crop the middle;
    pad: scale the long side to `resolution`, pad the rest with black (-1 after normalisation).
    An image already at the target size is returned unchanged (pixel-exact round trips)."""
    if transform not in TRANSFORMS:
        raise DpldmError(f"data.transform must be one of {', '.join(TRANSFORMS)}; got {transform!r}")
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    resample = Image.Resampling.BICUBIC
    if transform == "resize":
        return img.resize((resolution, resolution), resample)
    if transform == "center_crop":
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        img = img.resize((nw, nh), resample) if (nw, nh) != (w, h) else img
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        return img.crop((left, top, left + resolution, top + resolution))
    s = resolution / max(w, h)
    nw, nh = min(resolution, max(1, round(w * s))), min(resolution, max(1, round(h * s)))
    img = img.resize((nw, nh), resample) if (nw, nh) != (w, h) else img
    canvas = Image.new(img.mode, (resolution, resolution))
    canvas.paste(img, ((resolution - nw) // 2, (resolution - nh) // 2))
    return canvas


def to_float_chw(img: Image.Image) -> np.ndarray:
    """uint8 PIL image → float32 [C,H,W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return (arr.transpose(2, 0, 1).astype(np.float32) / 127.5) - 1.0


def from_float_chw(x: np.ndarray) -> np.ndarray:
    """float [C,H,W] in [-1, 1] → uint8 [H,W] (gray) or [H,W,C]."""
    arr = np.clip(np.rint((np.asarray(x, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    arr = arr.transpose(1, 2, 0)
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


def make_grid(images: Sequence[Image.Image], columns: int = 0, pad: int = 2) -> Image.Image:
    """Tile images (any sizes and modes) into one RGB grid, each centred in a cell of the largest size."""
    if not images:
        raise DpldmError("make_grid: no images to draw")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cw = max(im.size[0] for im in images)
    ch = max(im.size[1] for im in images)
    grid = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x = pad + c * (cw + pad) + (cw - im.size[0]) // 2
        y = pad + r * (ch + pad) + (ch - im.size[1]) // 2
        grid.paste(convert_channels(im, 3), (x, y))
    return grid
