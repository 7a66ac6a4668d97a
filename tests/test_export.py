"""`dpldm export`: the run's trained weights land in a folder plain diffusers loads and samples from."""
import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dpldm.cli import main as cli_main
from dpldm.config import Config, ModelConfig, save_config
from dpldm.errors import DpldmError
from dpldm.models import pipeline as P
from dpldm.models.export import export_run


def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(channels=1, resolution=16, latent_channels=4, vae_block_channels=[8, 16],
                       unet_block_channels=[16, 32], unet_attention=[False, True], norm_groups=8,
                       unet_attention_head_dim=4, max_text_length=8)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "pipe"
    P.save_pipeline(P.build_components(tiny_model_cfg(), source="test"), folder)
    return folder


def make_run(tmp_path, base, kind, tensors):
    run = tmp_path / f"run-{kind}"
    cfg = Config()
    cfg.model.pretrained = str(base)
    cfg.model.class_names, cfg.model.prompt_template = ["zero", "one"], "digit {name}"
    cfg.adapter.kind = kind
    save_config(cfg, run / "config.yaml")
    (run / "adapter").mkdir()
    save_file(tensors, str(run / "adapter" / "adapter.safetensors"))
    return run


def sample(folder):
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    return pipe(["digit one"], num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_export_attention_weights(tmp_path, base):
    unet = P.load_pipeline(base).unet
    trained = {n: p.detach() + 0.05 for n, p in unet.named_parameters() if ".attn2." in n}
    assert trained
    run = make_run(tmp_path, base, "attention", trained)
    out = tmp_path / "exported"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    sd = pipe.unet.state_dict()
    for name, t in trained.items():
        torch.testing.assert_close(sd[name], t)
    untouched = [n for n in sd if ".attn2." not in n][0]
    torch.testing.assert_close(sd[untouched], unet.state_dict()[untouched])
    comps = P.load_pipeline(out)
    assert comps.meta["class_names"] == ["zero", "one"] and "attention" in comps.meta["source"]
    a, b = sample(out), sample(base)
    assert a.shape == (1, 16, 16, 1) and np.isfinite(a).all()
    assert not np.allclose(a, b)


def test_export_full_with_prefixed_names(tmp_path, base):
    unet = P.load_pipeline(base).unet
    trained = {f"unet.{n}": torch.zeros_like(p) for n, p in unet.named_parameters()}
    run = make_run(tmp_path, base, "full", trained)
    out = export_run(run, tmp_path / "full")
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    assert all(torch.count_nonzero(p) == 0 for p in reloaded.parameters())


def test_export_errors(tmp_path, base):
    with pytest.raises(DpldmError, match="config.yaml"):
        export_run(tmp_path, tmp_path / "x")
    run = make_run(tmp_path, base, "full", {"not_a_weight": torch.zeros(2)})
    with pytest.raises(DpldmError, match="not_a_weight"):
        export_run(run, tmp_path / "y")
    assert cli_main(["export", str(run), "--out", str(tmp_path / "z")]) == 2
