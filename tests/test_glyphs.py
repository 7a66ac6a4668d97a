"""`glyphs:digits` / `glyphs:letters`: procedurally rendered public glyphs are deterministic given the public seed,
labelled right (balanced, and recognisable: a tiny classifier learns them), normalised like MNIST, and pack to
shards that read back pixel for pixel."""
from __future__ import annotations

import numpy as np
import pytest

from dpldm.data import glyphs
from dpldm.data.pack import pack
from dpldm.data.sources import open_source
from dpldm.data.stream import iterate_samples
from dpldm.errors import DpldmError


def test_deterministic_given_the_public_seed():
    a = open_source("glyphs:digits", "train")
    b = open_source("glyphs:digits", "train")
    for i in (0, 7, 12345):
        ra, rb = a.record(i), b.record(i)
        assert np.array_equal(ra.image, rb.image) and ra.label == rb.label and ra.origin == rb.origin
    # other seed / other split: other images (same labels, i mod 10)
    other, test = open_source("glyphs:digits:1", "train"), open_source("glyphs:digits", "test")
    assert other.name == "glyphs:digits:1" and a.name == "glyphs:digits"
    assert not np.array_equal(a.record(3).image, other.record(3).image)
    assert not np.array_equal(a.record(3).image, test.record(3).image)
    assert len(a) == 60000 and len(test) == 10000


def test_labels_are_balanced_and_match_the_drawn_character():
    src = open_source("glyphs:letters", "train")
    assert src.class_names == list("abcdefghijklmnopqrstuvwxyz")
    recs = [src.record(i) for i in range(52)]
    assert [r.label for r in recs] == [i % 26 for i in range(52)]
    for r in recs:                                    # origin "face:char"; the char is the label's letter
        assert r.origin.rsplit(":", 1)[1].lower() == src.class_names[r.label]
    cases = {r.origin.rsplit(":", 1)[1].isupper() for r in recs}
    assert cases == {True, False}                     # both cases, as EMNIST letters merges them
    digits = open_source("glyphs:digits", "test")
    assert all(digits.record(i).origin.endswith(f":{i % 10}") for i in range(30))


def test_mnist_normalisation_box_and_centre_of_mass():
    src = open_source("glyphs:digits", "train")
    for i in range(40):
        img = src.record(i).image.astype(np.float64)
        assert img.shape == (28, 28) and src.record(i).image.dtype == np.uint8
        ys, xs = np.nonzero(img > 0)
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 21      # fits the 20x20 box (+ AA fringe)
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 >= 18      # longer side ~ 20 px
        cy = (np.arange(28)[:, None] * img).sum() / img.sum()
        cx = (np.arange(28)[None, :] * img).sum() / img.sum()
        assert abs(cy - 13.5) <= 1.0 and abs(cx - 13.5) <= 1.0             # centred by centre of mass


def test_mnist_normalise_on_a_known_shape():
    a = np.zeros((96, 96))
    a[10:50, 60:70] = 255                             # a 40x10 bar in a corner
    out = glyphs.mnist_normalise(a)
    ys, xs = np.nonzero(out > 127)
    assert ys.max() - ys.min() + 1 == 20 and 4 <= xs.max() - xs.min() + 1 <= 6
    assert abs(ys.mean() - 13.5) <= 0.5 and abs(xs.mean() - 13.5) <= 0.5
    with pytest.raises(DpldmError, match="empty"):
        glyphs.mnist_normalise(np.zeros((96, 96)))


def test_the_digits_are_learnable():
    """A nearest-class-mean classifier on 600 glyphs beats chance by far on 200 held-out glyphs (labels right)."""
    src = open_source("glyphs:digits", "train")
    x = np.stack([src.record(i).image for i in range(800)]).reshape(800, -1).astype(np.float64) / 255
    y = np.arange(800) % 10
    means = np.stack([x[:600][y[:600] == k].mean(0) for k in range(10)])
    pred = ((x[600:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y[600:]).mean() > 0.5


def test_pack_round_trip(tmp_path):
    meta = pack("glyphs:digits", tmp_path, limit=30, shard_size=20, workers=1, verbose=False)
    assert meta["count"] == 30 and meta["class_names"] == [str(i) for i in range(10)]
    assert meta["label_histogram"] == {str(k): 3 for k in range(10)} and meta["source"] == "glyphs:digits"
    src = open_source("glyphs:digits", "train")
    samples = list(iterate_samples(str(tmp_path)))
    assert [s["label"] for s in samples] == [i % 10 for i in range(30)]
    for i in (0, 17, 29):
        back = np.rint((samples[i]["pixels"][0] + 1) * 127.5).astype(np.uint8)
        assert np.array_equal(back, src.record(i).image)


def test_bad_specs_name_the_field():
    with pytest.raises(DpldmError, match="glyphs:digits or glyphs:letters"):
        open_source("glyphs:emoji", "train")
    with pytest.raises(DpldmError, match="SEED"):
        open_source("glyphs:digits:x", "train")


def test_missing_font_names_its_package(monkeypatch, tmp_path):
    glyphs.faces.cache_clear()
    monkeypatch.setattr(glyphs, "FONT_ROOT", tmp_path)
    try:
        with pytest.raises(DpldmError, match="apt-get install fonts-dkg-handwriting"):
            open_source("glyphs:digits", "train")
    finally:
        glyphs.faces.cache_clear()
