"""The latent cache validates the whole private set when it is built (issue 11 §7)."""
import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dpldm.config import Config, apply_mapping
from dpldm.errors import DpldmError
from tiny import tiny_model_config


def _shards(folder, labels, texts=None):
    """One shard of 16×16 gray images; label None → no .cls (an unlabeled example)."""
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16), 10 * i, dtype=np.uint8)).save(buf, format="PNG")
            sample = {"__key__": f"{i:09d}", "png": buf.getvalue()}
            if label is not None:
                sample["cls"] = str(label).encode()
            if texts:
                sample["txt"] = texts[i].encode()
            sink.write(sample)
    return folder


def _build(tmp_path, shards):
    from dpldm.data.latent_cache import build_cache
    from dpldm.models.pipeline import build_vae
    torch.manual_seed(0)
    vae = build_vae(tiny_model_config())
    cfg = apply_mapping(Config(), {"data.private": str(shards), "data.transform": "pad", "model.resolution": 16,
                                   "model.channels": 1, "output.dir": str(tmp_path / "run")})
    return build_cache(cfg, vae, tmp_path / "cache", log=lambda *_: None)


def test_unlabeled_example_in_a_class_conditional_set_fails_at_cache_build(tmp_path):
    shards = _shards(tmp_path / "mixed", [0, 1, 2, None, 4, 5, None, 7])
    with pytest.raises(DpldmError, match=r"2 of 8 examples .* have no label \(first: key '000000003'\)") as e:
        _build(tmp_path, shards)
    assert "\n" not in str(e.value) and str(shards) in str(e.value)
    assert not (tmp_path / "cache").exists()                  # nothing written


def test_fully_labeled_unlabeled_and_captioned_sets_build(tmp_path):
    assert (_build(tmp_path, _shards(tmp_path / "all", [0, 1, 2, 3])).labels >= 0).all()
    assert (_build(tmp_path, _shards(tmp_path / "none", [None] * 4)).labels < 0).all()
    captioned = _build(tmp_path, _shards(tmp_path / "txt", [0, None, 2, None], texts=["a", "b", "c", "d"]))
    assert captioned.texts == ["a", "b", "c", "d"]            # text-conditioned: labels are not used


def test_an_older_cache_with_an_unlabeled_example_is_refused_on_load(tmp_path):
    from dpldm.data.latent_cache import LatentCache
    cache = _build(tmp_path, _shards(tmp_path / "all", [0, 1, 2, 3]))
    labels = np.array([0, -1, 2, 3])
    np.save(cache.path / "labels.npy", labels)
    with pytest.raises(DpldmError, match="1 of 4 examples in latent cache .* have no label"):
        LatentCache(cache.path)


def test_private_shards_truncated_against_their_pack_manifest_are_refused(tmp_path):
    """Shards copied half-way must not train silently on what is left (N and q would change without a word)."""
    import shutil
    import tarfile

    from dpldm.data.pack import pack
    packed = tmp_path / "packed"
    pack("mnist", packed, split="train", limit=48, shard_size=16, verbose=False)
    assert len(_build(tmp_path, packed)) == 48                         # complete: builds
    missing = tmp_path / "missing"
    shutil.copytree(packed, missing)
    sorted(missing.glob("shard-*.tar"))[-1].unlink()                   # a shard never arrived
    with pytest.raises(DpldmError, match=r"read 32 samples from .* but its dataset.json counts 48: the shards are "
                                         r"truncated or incomplete"):
        _build(tmp_path, missing)
    cut = tmp_path / "cut"
    shutil.copytree(packed, cut)
    last = sorted(cut.glob("shard-*.tar"))[-1]                         # cut at a sample boundary: a valid tar
    with tarfile.open(last) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    keep = sorted({m.name.split(".")[0] for m, _ in members})[:5]
    with tarfile.open(last, "w") as dst:
        for m, data in members:
            if m.name.split(".")[0] in keep:
                dst.addfile(m, io.BytesIO(data))
    with pytest.raises(DpldmError, match="read 37 samples"):
        _build(tmp_path, cut)
    logged = []
    from dpldm.data.shards import check_complete
    check_complete(str(_shards(tmp_path / "foreign", [0, 1])), 2, log=logged.append)   # no manifest: a notice
    assert "cannot be checked" in logged[0]
