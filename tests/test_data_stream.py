"""The streaming shard reader: splitting over ranks × workers, shuffling, decoding, transforms,
bad-input policy (public skip vs private raise), shards from plain ShardWriter, patterns and pipes."""
from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dpldm.config import DataConfig
from dpldm.data.shards import BadSampleWarning, count_samples, expand_shards, reader_records
from dpldm.data.stream import iterate_samples, stream_loader
from dpldm.errors import DpldmError

SHARD_SIZES = [7, 3, 5, 4, 6]  # 25 samples, uneven shards: 5 shards never divide evenly by 2×2 or 3×2


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _gray(i: int, size: int = 8) -> np.ndarray:
    return ((np.arange(size * size).reshape(size, size) * 3 + i * 7) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """5 shards written by plain ShardWriter: key s<i>, 8×8 gray PNG, label i % 10."""
    d = tmp_path_factory.mktemp("shards")
    i = 0
    for s, n in enumerate(SHARD_SIZES):
        with wds.TarWriter(str(d / f"part-{s:02d}.tar")) as w:
            for _ in range(n):
                w.write({"__key__": f"s{i:03d}", "png": _png(_gray(i)), "cls": str(i % 10)})
                i += 1
    return d


def all_keys():
    return [f"s{i:03d}" for i in range(sum(SHARD_SIZES))]


@pytest.mark.parametrize("readers", [1, 2, 3, 4, 5, 6, 7, 11])
def test_reader_split_covers_each_record_once(shards, readers):
    urls = expand_shards(str(shards))
    seen = Counter()
    for r in range(readers):
        seen.update(rec["__key__"] for rec in reader_records(urls, r, readers))
    assert sorted(seen) == all_keys() and set(seen.values()) == {1}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2])
def test_ranks_and_dataloader_workers_see_each_sample_once(shards, world_size, workers):
    cfg = DataConfig(num_workers=workers, shuffle_buffer=4)
    seen = Counter()
    for rank in range(world_size):
        for batch in stream_loader(str(shards), cfg, 8, 1, batch_size=4, rank=rank, world_size=world_size,
                                   epoch=1, seed=3):
            assert batch["pixels"].shape[1:] == (1, 8, 8) and len(batch["key"]) <= 4
            seen.update(batch["key"])
    assert sorted(seen) == all_keys() and set(seen.values()) == {1}


def test_shuffle_depends_on_seed_and_epoch_only(shards):
    cfg = DataConfig(shuffle_buffer=10)

    def order(epoch, seed=0):
        batches = stream_loader(str(shards), cfg, 8, 1, batch_size=5, epoch=epoch, seed=seed)
        return [k for b in batches for k in b["key"]]

    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c and sorted(a) == sorted(c) == all_keys()
    assert order(0, seed=1) != a
    unshuffled = [k for b in stream_loader(str(shards), cfg, 8, 1, batch_size=5, shuffle=False) for k in b["key"]]
    assert unshuffled == all_keys()


def test_batches_values_and_last_partial_batch(shards):
    batches = list(stream_loader(str(shards), DataConfig(), 8, 1, batch_size=10, shuffle=False))
    assert [len(b["key"]) for b in batches] == [10, 10, 5]
    b = batches[0]
    assert b["pixels"].dtype == torch.float32 and b["label"].dtype == torch.int64
    assert b["label"].tolist() == [i % 10 for i in range(10)] and b["text"] == [""] * 10
    expect = torch.from_numpy(_gray(3).astype(np.float32) / 127.5 - 1)
    assert torch.equal(b["pixels"][3, 0], expect)
    assert float(b["pixels"].min()) >= -1 and float(b["pixels"].max()) <= 1


def test_channels_and_transforms(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :, 0] = 200
    rgb[:, 10:30, 1] = 100
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write({"__key__": "wide", "png": _png(rgb), "cls": "1"})
        w.write({"__key__": "gray", "png": _png(_gray(0, 16)), "cls": "2"})
    pattern = str(tmp_path / "a.tar")

    def first(transform, channels, key="wide"):
        cfg = DataConfig(transform=transform)
        return next(s for s in iterate_samples(pattern, cfg, 16, channels) if s["key"] == key)["pixels"]

    assert first("resize", 3).shape == (3, 16, 16)
    padded = first("pad", 3)  # 40×20 → 16×8 centred, rows 0..3 and 12..15 are black padding (-1)
    assert np.all(padded[:, :4] == -1) and np.all(padded[:, 12:] == -1) and padded[0, 8, 8] > 0
    cropped = first("center_crop", 3)  # 40×20 → 32×16, middle 16 columns: green band covers all of it
    assert np.all(cropped[1] > -0.5)
    gray = first("resize", 1)
    lum = np.asarray(Image.fromarray(rgb).convert("L").resize((16, 16), Image.Resampling.BICUBIC))
    assert np.allclose(gray[0], lum / 127.5 - 1, atol=1e-6)
    g3 = first("resize", 3, key="gray")
    assert torch.equal(torch.from_numpy(g3[0]), torch.from_numpy(g3[2]))
    assert np.allclose(g3[0], _gray(0, 16) / 127.5 - 1, atol=1e-6)
    with pytest.raises(DpldmError, match="4 channels"):
        first("resize", 4)
    with pytest.raises(DpldmError, match="channels"):
        next(iter(stream_loader(pattern, DataConfig(), 16, 2, batch_size=2)))


@pytest.fixture
def bad_shards(tmp_path):
    """good.tar (4 fine samples, one with garbage image bytes, one without .cls) + a truncated tar."""
    with wds.TarWriter(str(tmp_path / "good.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"ok{i}", "png": _png(_gray(i)), "cls": str(i)})
        w.write({"__key__": "garbage", "png": b"\x89PNG not really", "cls": "1"})
        w.write({"__key__": "nolabel", "png": _png(_gray(9)), "txt": "a caption"})
    with wds.TarWriter(str(tmp_path / "whole.tar")) as w:
        for i in range(30):
            w.write({"__key__": f"t{i:02d}", "png": _png(_gray(i, 16)), "cls": "0"})
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "trunc.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "whole.tar").unlink()
    return tmp_path


def test_public_bad_samples_are_skipped_counted_and_warned(bad_shards):
    loader = stream_loader(str(bad_shards), DataConfig(), 8, 1, batch_size=64, shuffle=False, require_label=True)
    with pytest.warns(BadSampleWarning) as rec:
        keys = [k for b in loader for k in b["key"]]
    assert keys[:4] == ["ok0", "ok1", "ok2", "ok3"] and "garbage" not in keys and "nolabel" not in keys
    assert 5 <= len(keys) < 4 + 30  # the truncated shard gives its readable head only
    reasons = {b.key: (b.shard, b.reason) for b in loader.skipped}
    assert set(reasons) >= {"garbage", "nolabel"} and len(loader.skipped) == 3
    assert reasons["garbage"][0].endswith("good.tar") and "decodable" in reasons["garbage"][1]
    assert "missing .cls" in reasons["nolabel"][1]
    trunc = [b for b in loader.skipped if b.shard.endswith("trunc.tar")][0]
    assert trunc.key.startswith("t") and "tar" in trunc.reason
    assert any("garbage" in str(w.message) and "good.tar" in str(w.message) for w in rec)


def test_without_required_labels_a_missing_cls_is_label_minus_one(bad_shards):
    loader = stream_loader(str(bad_shards / "good.tar"), DataConfig(), 8, 1, batch_size=64, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        (batch,) = list(loader)
    i = batch["key"].index("nolabel")
    assert batch["label"][i] == -1 and batch["text"][i] == "a caption"
    assert [b.key for b in loader.skipped] == ["garbage"]


@pytest.mark.parametrize("which,key", [("good.tar", "garbage"), ("trunc.tar", "t")])
def test_private_data_always_raises_naming_shard_and_key(bad_shards, which, key):
    cfg = DataConfig(on_error="skip")
    with pytest.raises(DpldmError, match=rf"private data: shard .*{which}, key {key}"):
        for _ in stream_loader(str(bad_shards / which), cfg, 8, 1, batch_size=4, private=True, world_size=1):
            pass


def test_private_missing_label_raises_and_public_on_error_raise(bad_shards):
    with wds.TarWriter(str(bad_shards / "nolabel.tar")) as w:
        w.write({"__key__": "fine", "png": _png(_gray(1)), "cls": "1"})
        w.write({"__key__": "nolabel", "png": _png(_gray(2))})
    with pytest.raises(DpldmError, match="nolabel.tar, key nolabel: missing .cls"):
        list(iterate_samples(str(bad_shards / "nolabel.tar"), private=True, require_label=True))
    assert [s["label"] for s in iterate_samples(str(bad_shards / "nolabel.tar"), private=True)] == [1, -1]
    with pytest.raises(DpldmError, match=r"good.tar, key garbage: .*on_error=raise"):
        list(stream_loader(str(bad_shards / "good.tar"), DataConfig(on_error="raise"), 8, 1, batch_size=2,
                           shuffle=False))


def test_private_error_crosses_dataloader_workers_as_one_line(bad_shards):
    cfg = DataConfig(num_workers=2)
    with pytest.raises(DpldmError) as e:
        list(stream_loader(str(bad_shards / "good.tar"), cfg, 8, 1, batch_size=2, private=True))
    assert "\n" not in str(e.value) and "key garbage" in str(e.value)


def test_plain_shardwriter_jpg_cls_and_png_txt(tmp_path):
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(tmp_path / "j-%03d.tar"), maxcount=4, verbose=0) as w:
        for i in range(6):
            w.write({"__key__": f"j{i}", "jpg": Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)),
                     "cls": i})
    batches = list(stream_loader(str(tmp_path / "j-{000..001}.tar"), DataConfig(), 16, 3, batch_size=4, shuffle=False))
    assert [b["key"] for b in batches] == [["j0", "j1", "j2", "j3"], ["j4", "j5"]]
    assert batches[1]["label"].tolist() == [4, 5] and batches[0]["pixels"].shape == (4, 3, 16, 16)
    with wds.ShardWriter(str(tmp_path / "t-%03d.tar"), maxcount=10, verbose=0) as w:
        for i in range(3):
            w.write({"__key__": f"t{i}", "png": _png(_gray(i)), "txt": f"caption {i}"})
    samples = list(iterate_samples(str(tmp_path / "t-000.tar")))
    assert [s["text"] for s in samples] == ["caption 0", "caption 1", "caption 2"]
    assert [s["label"] for s in samples] == [-1, -1, -1] and samples[0]["pixels"].shape == (1, 8, 8)


def test_patterns_pipe_and_count(shards):
    names = sorted(p.name for p in shards.glob("*.tar"))
    brace = str(shards / "part-{00..04}.tar")
    pipe = f"pipe:cat {shards}/part-{{00..04}}.tar"
    assert expand_shards(brace) == expand_shards(str(shards)) == [str(shards / n) for n in names]
    assert expand_shards(pipe)[0] == f"pipe:cat {shards}/part-00.tar"
    for pattern in (str(shards), brace, pipe, str(shards / "part-*.tar")):
        keys = [k for b in stream_loader(pattern, DataConfig(), 8, 1, batch_size=8, shuffle=False) for k in b["key"]]
        assert keys == all_keys(), pattern
        assert count_samples(pattern) == len(all_keys())
    assert count_samples(str(shards / "part-{00..01}.tar")) == SHARD_SIZES[0] + SHARD_SIZES[1]


def test_bad_patterns_and_counts_are_clear_errors(tmp_path, bad_shards):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpldmError, match="no \\*.tar"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(DpldmError, match="shard .*missing-1.tar does not exist"):
        expand_shards(str(tmp_path / "missing-{1..2}.tar"))
    with pytest.raises(DpldmError, match="trunc.tar"):
        count_samples(str(bad_shards / "trunc.tar"))
    with pytest.raises(DpldmError, match="rank"):
        stream_loader(str(bad_shards), DataConfig(), 8, 1, batch_size=2, rank=2, world_size=2)
    loader = stream_loader("pipe:cat /nonexistent/x.tar", DataConfig(), 8, 1, batch_size=2)
    with pytest.warns(BadSampleWarning):
        assert list(loader) == []
    assert "x.tar" in loader.skipped[0].shard


def test_gnu_long_names_and_gzipped_shards(tmp_path):
    """Shards from other tar writers: GNU long member names, and a gzip-compressed tar."""
    import tarfile
    long_key = "dir/" + "x" * 120
    with tarfile.open(tmp_path / "gnu.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, label in ((long_key, 3), ("short", 4)):
            for ext, data in (("png", _png(_gray(label))), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "gz.tar.gz", "w:gz") as tar, tarfile.open(tmp_path / "gnu.tar") as src:
        for m in src.getmembers():
            tar.addfile(m, src.extractfile(m))
    for name in ("gnu.tar", "gz.tar.gz"):
        samples = list(iterate_samples(str(tmp_path / name)))
        assert [(s["key"], s["label"]) for s in samples] == [(long_key, 3), ("short", 4)], name
        assert count_samples(str(tmp_path / name)) == 2
