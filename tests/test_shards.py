"""One shard layer (dpldm/data/shards.py): training (stream) and evaluation (eval/shards) read the same pixels,
labels and channels from the same records; packing, sampling and evaluation write through one writer."""
from __future__ import annotations

import io

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dpldm.data.shards import ShardWriter, count_samples
from dpldm.data.stream import iterate_samples
from dpldm.eval.shards import load_shards, write_shards


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _both(path):
    train = torch.stack([torch.from_numpy(s["pixels"]) for s in iterate_samples(str(path))])
    evaluated, labels = load_shards(str(path), require_labels=False)
    return (train + 1) / 2, evaluated, labels


def test_16_bit_gray_reads_the_same_in_training_and_evaluation(tmp_path):
    """Evaluation used to clip I;16 images at 255 (every value above 255 became white); training rescales
    65535 → 255. Both now go through the same decode."""
    arr = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)                                        # mode I;16
    assert img.mode == "I;16"
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        w.write({"__key__": "a", "png": _png(img), "cls": b"3"})
    train, evaluated, labels = _both(tmp_path / "s.tar")
    assert evaluated.shape == (1, 1, 2, 2) and labels.tolist() == [3]
    torch.testing.assert_close(evaluated, train, atol=1e-6, rtol=0)
    expected = torch.tensor([[0, 4], [128, 255]]) / 255.0            # round(v / 65535 · 255)
    torch.testing.assert_close(evaluated[0, 0], expected, atol=1e-6, rtol=0)


def test_gray_with_alpha_is_one_channel_in_training_and_evaluation(tmp_path):
    """An LA image is gray: evaluation used to read it as RGB (3 channels) while training read 1."""
    img = Image.fromarray(np.stack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 255, np.uint8)], -1), "LA")
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        w.write({"__key__": "a", "png": _png(img)})
    train, evaluated, _ = _both(tmp_path / "s.tar")
    assert evaluated.shape == train.shape == (1, 1, 4, 4)
    torch.testing.assert_close(evaluated, train, atol=1e-6, rtol=0)


def test_json_label_is_a_label_in_evaluation_too(tmp_path):
    """img2dataset-style records with the label only in .json: training read it, evaluation refused it."""
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        w.write({"__key__": "a", "png": _png(Image.new("L", (4, 4), 7)), "json": b'{"label": 5}'})
    _, labels = load_shards(str(tmp_path / "s.tar"))
    assert labels.tolist() == [5]


def test_writer_round_trip_keys_labels_captions_and_shard_split(tmp_path):
    images = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    paths = write_shards(images, torch.tensor([0, 1, 2, 3, 4]), tmp_path / "out", shard_size=2,
                         texts=[f"t{i}" for i in range(5)])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert count_samples(str(tmp_path / "out")) == 5
    x, y = load_shards(str(tmp_path / "out"))
    assert torch.equal((x * 255).round().to(torch.uint8), images) and y.tolist() == [0, 1, 2, 3, 4]
    samples = list(iterate_samples(str(tmp_path / "out")))
    assert [s["text"] for s in samples] == [f"t{i}" for i in range(5)]
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(5)]
    with ShardWriter(tmp_path / "meta", "x-%03d.tar") as sink:
        sink.write("k", np.zeros((4, 4), np.uint8), meta={"prompt": "p"})
    assert sink.paths == [str(tmp_path / "meta" / "x-000.tar")]


def test_hand_parsed_tar_members_equal_tarfiles_in_every_format(tmp_path):
    """_tar_files parses uncompressed tars itself (5-10x less Python per member than tarfile): for ustar (with its
    name prefix), GNU (long names, base-256 sizes) and pax (float mtimes, long paths) tars it yields what tarfile
    yields; a member cut short raises tarfile.ReadError; a gzipped tar goes through tarfile."""
    import gzip
    import tarfile

    import pytest

    from dpldm.data.shards import _tar_files
    names = ["a.png", "d/" + "p" * 90 + "/" + "n" * 60 + ".cls", "x" * 140 + ".json", "ü.txt"]
    payloads = [b"", b"1" * 513, bytes(range(256)) * 3, "é".encode()]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"f{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in zip(names, payloads):
                if fmt == tarfile.USTAR_FORMAT and len(name.rsplit("/", 1)[-1]) > 100:
                    continue                                  # ustar cannot hold it
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1.5e9 + 0.25
                tar.addfile(info, io.BytesIO(data))
            tar.addfile(_dir_info())                           # not a file: skipped
        with tarfile.open(path) as tar:
            want = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
        with open(path, "rb") as f:
            assert list(_tar_files(f)) == want and len(want) >= 3, fmt
    raw = (tmp_path / f"f{tarfile.PAX_FORMAT}.tar").read_bytes()
    gz = tmp_path / "f.tar.gz"
    gz.write_bytes(gzip.compress(raw))
    with open(gz, "rb") as f:
        assert [n for n, _ in _tar_files(f)] == [n for n, _ in _tar_files(io.BytesIO(raw))]
    cut = raw[:raw.index(b"1" * 513) + 100]                    # inside the second member's data
    with pytest.raises(tarfile.ReadError):
        list(_tar_files(io.BytesIO(cut)))


def _dir_info():
    import tarfile
    info = tarfile.TarInfo("adir")
    info.type = tarfile.DIRTYPE
    return info
