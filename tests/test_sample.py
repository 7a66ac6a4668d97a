"""Sampling: determinism by seed, independence from batch size, shapes at 32/64/256 px, guidance on/off,
shards readable by plain webdataset, a fine-tuned run samples with its own class prompts."""
import json

import pytest
import torch
import webdataset as wds

from dpldm.errors import DpldmError
from dpldm.models.pipeline import load_pipeline
from dpldm.sample import generate, sample_run
from tiny import make_tiny_pipeline

GEN = dict(steps=3, scheduler="dpm++", batch_size=4)


@pytest.fixture(scope="module")
def pipe32(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("s") / "p32", resolution=32)


def test_same_seed_same_images_any_batch_size(pipe32):
    comps = load_pipeline(pipe32)
    prompts = ["digit 1", "digit 2", "digit 3"]
    a = generate(comps, prompts, [0, 1, 2], guidance=2.0, seed=7, resolution=32, **GEN)
    b = generate(comps, prompts, [0, 1, 2], guidance=2.0, seed=7, resolution=32, **{**GEN, "batch_size": 1})
    c = generate(comps, prompts, [0, 1, 2], guidance=2.0, seed=8, resolution=32, **GEN)
    assert a.shape == (3, 1, 32, 32) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().mean() > 1e-3


def test_guidance_changes_output(pipe32):
    comps = load_pipeline(pipe32)
    with torch.no_grad():  # a random U-Net barely reacts to its condition: make it react
        for n, p in comps.unet.named_parameters():
            if "attn2.to_v" in n or "attn2.to_out" in n:
                p.mul_(20)
    off = generate(comps, ["digit 5"], [0], guidance=1.0, seed=0, resolution=32, **GEN)
    on = generate(comps, ["digit 5"], [0], guidance=7.5, seed=0, resolution=32, **GEN)
    assert (off - on).abs().mean() > 1e-4


@pytest.mark.parametrize("res,vae", [(64, (8, 16)), (256, (8, 8, 16, 16))])
def test_shapes_at_higher_resolution(tmp_path, res, vae):
    comps = load_pipeline(make_tiny_pipeline(tmp_path / f"p{res}", resolution=res, vae_block_channels=vae,
                                             channels=3))
    out = generate(comps, ["digit 0"], [0], guidance=2.0, seed=0, resolution=res, steps=2, scheduler="ddim",
                   batch_size=1)
    assert out.shape == (1, 3, res, res)
    with pytest.raises(DpldmError, match="multiple"):
        generate(comps, ["x"], [0], guidance=2.0, seed=0, resolution=res + 4, steps=1, scheduler="ddim", batch_size=1)


def test_sample_run_writes_pngs_grid_and_shards(tmp_path, pipe32):
    out = sample_run(pipe32, tmp_path / "samples", n=20, steps=2, batch_size=10, scheduler="euler")
    assert (out / "grid.png").exists() and len(list((out / "images").glob("*.png"))) == 20
    samples = list(wds.WebDataset(str(next((out / "shards").glob("*.tar"))), shardshuffle=False).decode("pil"))
    assert len(samples) == 20
    labels = [int(s["cls"]) for s in samples]
    assert sorted(labels) == sorted([i % 10 for i in range(20)])  # class-balanced
    meta = samples[3]["json"]  # decoded by webdataset
    assert meta["prompt"] == f"digit {labels[3]}" and samples[3]["png"].size == (32, 32)
    record = json.loads((out / "samples.json").read_text())     # what makes these samples (cache key for reuse)
    assert record["n"] == 20 and record["steps"] == 2 and record["scheduler"] == "euler" and "guidance" in record


def test_prompt_and_class_options(tmp_path, pipe32):
    out = sample_run(pipe32, tmp_path / "t", n=2, prompt="a handwritten seven", steps=1, scheduler="ddim")
    s = next(iter(wds.WebDataset(str(next((out / "shards").glob("*.tar"))), shardshuffle=False)))
    assert s["txt"].decode() == "a handwritten seven" and "cls" not in s
    with pytest.raises(DpldmError, match="--class"):
        sample_run(pipe32, tmp_path / "c", n=2, class_id=11, steps=1)


def test_bf16_sampling_stays_close_to_fp32(pipe32):
    """sample.precision bf16 runs the U-Net and decoder under bf16 autocast: not bit-equal to fp32 (so it ran),
    but the same images to within bf16 rounding; fp32 is the exact default of generate()."""
    comps = load_pipeline(pipe32)
    prompts = ["digit 1", "digit 2"]
    fp32 = generate(comps, prompts, [0, 1], guidance=2.0, seed=3, resolution=32, **GEN)
    again = generate(comps, prompts, [0, 1], guidance=2.0, seed=3, resolution=32, precision="fp32", **GEN)
    bf16 = generate(comps, prompts, [0, 1], guidance=2.0, seed=3, resolution=32, precision="bf16", **GEN)
    assert torch.equal(fp32, again)
    diff = (bf16 - fp32).abs()
    assert 0 < diff.mean() < 0.02 and diff.max() < 0.2


def test_precision_auto_follows_the_cpu_flags(tmp_path, pipe32):
    from dpldm.precision import native_bf16, resolve
    flags = open("/proc/cpuinfo").read().split()
    assert native_bf16("cpu") == ("amx_bf16" in flags or "avx512_bf16" in flags)
    assert resolve("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve("fp32", "cpu") == "fp32" and resolve("bf16", "cpu") == "bf16"
    with pytest.raises(DpldmError, match="sample.precision"):
        resolve("fp16", "cpu")
    out = sample_run(pipe32, tmp_path / "s", n=2, steps=1, scheduler="ddim")
    record = json.loads((out / "samples.json").read_text())
    assert record["precision"] == "auto" and record["dtype"] == resolve("auto", "cpu")
