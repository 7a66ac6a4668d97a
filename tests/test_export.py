"""`dpldm export`: the run's trained weights land in a folder plain diffusers loads and samples from."""
import json
from pathlib import Path

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
from dpldm.models.text_encoders import load_text_encoder


def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(channels=1, resolution=16, latent_channels=4, vae_block_channels=[8, 16],
                       unet_block_channels=[16, 32], unet_attention=[False, True], norm_groups=8,
                       unet_attention_head_dim=4, max_text_length=8)


def tiny_text_encoder():
    """MiniLM's real tokenizer with a 1-layer, 32-wide BERT (fast; the export logic is encoder-agnostic)."""
    from transformers import BertConfig, BertModel
    tok, _ = load_text_encoder("minilm", 8)
    return tok, BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "pipe"
    P.save_pipeline(P.build_components(tiny_model_cfg(), text=tiny_text_encoder(), source="test"), folder)
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


def adapted_run(tmp_path, base, kind, nonlinearity="leaky_relu"):
    """A run whose adapter (real dpldm adapters, random non-zero weights) changes the U-Net."""
    from dpldm.models.adapters import attach_adapter, save_adapter, trainable_named_parameters
    unet = P.load_pipeline(base).unet
    cfg = Config()
    cfg.model.pretrained = str(base)
    cfg.adapter.kind, cfg.adapter.rank, cfg.adapter.nonlinearity = kind, 2, nonlinearity
    attach_adapter(unet, cfg.adapter)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable_named_parameters(unet).values():
            p.copy_(torch.randn_like(p) * 0.2)
    run = tmp_path / f"run-{kind}-{nonlinearity}"
    save_config(cfg, run / "config.yaml")
    save_adapter(unet, cfg.adapter, run / "adapter")
    return run, unet.eval()


def unet_out(unet):
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), enc).sample


def test_export_lora_merged_and_diffusers_lora_file(tmp_path, base):
    run, adapted = adapted_run(tmp_path, base, "lora")
    out = export_run(run, tmp_path / "lora")
    expected = unet_out(adapted)
    assert not torch.allclose(expected, unet_out(P.load_pipeline(base).unet), atol=1e-4)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe.unet) is diffusers.UNet2DConditionModel
    torch.testing.assert_close(unet_out(pipe.unet), expected, atol=1e-4, rtol=1e-4)
    base_pipe = diffusers.DiffusionPipeline.from_pretrained(base)
    base_pipe.load_lora_weights(out)          # reads pytorch_lora_weights.safetensors
    torch.testing.assert_close(unet_out(base_pipe.unet), expected, atol=1e-4, rtol=1e-4)


def test_export_loda_loads_with_plain_diffusers(tmp_path, base):
    run, adapted = adapted_run(tmp_path, base, "loda", "leaky_relu")
    out = export_run(run, tmp_path / "loda")
    assert (out / "unet" / "dpldm_adapter.json").is_file()
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["adapted_unet",
                                                                         "AdaptedUNet2DConditionModel"]
    assert {"adapted_unet.py", "loda.py"} <= {p.name for p in (out / "unet").iterdir()}
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(adapted), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unet_out(P.load_pipeline(out).unet), unet_out(adapted), atol=1e-5, rtol=1e-5)
    images = pipe(["x"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 1) and np.isfinite(images).all()


def test_shipped_unet_code_imports_no_dpldm_module():
    """What the export ships (adapted_unet.py, loda.py) may import the standard library, torch, diffusers and
    safetensors only, and each other relatively."""
    import ast
    import sys

    from dpldm.models.adapted_unet import CODE_FILES
    allowed = {"torch", "diffusers", "safetensors", "__future__"} | set(sys.stdlib_module_names)
    for f in CODE_FILES:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, f"{f.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed for a in node.names), f"{f.name}: {ast.dump(node)}"


NO_DPLDM_CHECK = """
import sys
import numpy as np
import torch
import diffusers
try:
    import dpldm
    sys.exit("dpldm is importable in this environment: " + str(dpldm.__file__))
except ModuleNotFoundError:
    pass
pipe = diffusers.DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(pipe.unet).__name__ == "AdaptedUNet2DConditionModel", type(pipe.unet)
g = torch.Generator().manual_seed(3)
x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
with torch.no_grad():
    np.save(sys.argv[2], pipe.unet(x, torch.tensor([10, 500]), enc).sample.numpy())
images = pipe(["x"], num_inference_steps=2, output_type="np").images
assert images.shape == (1, 16, 16, 1) and np.isfinite(images).all()
if len(sys.argv) > 3:   # re-save the loaded pipeline as a user sharing it would
    pipe.save_pretrained(sys.argv[3])
assert not any(m == "dpldm" or m.startswith("dpldm.") for m in sys.modules), "dpldm was imported"
"""


def test_exported_loda_pipeline_loads_and_samples_without_dpldm(tmp_path, base):
    """Issue 14 §6: `dpldm export` output loads and samples with diffusers alone. The check runs in a fresh
    virtual environment made with `python -m venv` from the base interpreter, whose site-packages holds one
    .pth line naming this venv's site-packages directory: torch, diffusers, transformers are importable from
    there, but a plain path line in a .pth does not run the .pth files inside that directory, so dpldm's editable
    install hook (__editable__.dpldm-*.pth) never runs and `import dpldm` fails (the script checks that). It runs
    with -I (no PYTHONPATH, no user site, no current directory on sys.path) from a directory outside the repo.
    The pipeline it loaded, re-saved with diffusers' save_pretrained, loads again in another such process."""
    import site
    import subprocess
    import venv

    run, adapted = adapted_run(tmp_path, base, "loda", "leaky_relu")
    out = export_run(run, tmp_path / "loda")
    env_dir = tmp_path / "nodpldm"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    target = subprocess.run([str(py), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if (Path(p) / "diffusers").is_dir()]
    assert ours, "no site-packages with diffusers"
    (Path(target) / "deps.pth").write_text(ours[0] + "\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    # the export, re-saved by plain diffusers; then that copy, loaded in another fresh process
    for folder, npy, resave in ((out, "out.npy", [str(tmp_path / "resaved")]), (tmp_path / "resaved", "re.npy", [])):
        result = subprocess.run([str(py), "-I", "-c", NO_DPLDM_CHECK, str(folder), str(tmp_path / npy), *resave],
                                cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, f"{folder}: {result.stderr[-3000:]}"
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / npy)), unet_out(adapted),
                                   atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "resaved" / "model_index.json").read_text())["unet"] == ["adapted_unet",
                                                                                         "AdaptedUNet2DConditionModel"]


def test_export_attention_adapter_folder(tmp_path, base):
    run, adapted = adapted_run(tmp_path, base, "attention")
    out = export_run(run, tmp_path / "attn")
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe.unet) is diffusers.UNet2DConditionModel
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(adapted), atol=1e-5, rtol=1e-5)


def test_class_names_derived_from_private_labels_are_left_out_and_said_so(tmp_path, base, capsys):
    """Issue 11 §9: a classes.json written from the private labels alone ("0".."K-1") is not exported; the
    export's dpldm.json names what was omitted. Names from the config or the pipeline are public and kept."""
    from dpldm.config import load_config
    from dpldm.models.export import public_classes
    unet = P.load_pipeline(base).unet
    trained = {n: p.detach() + 0.01 for n, p in unet.named_parameters() if ".attn2." in n}
    run = make_run(tmp_path, base, "attention", trained)
    cfg = load_config(run / "config.yaml")
    cfg.model.class_names = []
    save_config(cfg, run / "config.yaml")
    (run / "classes.json").write_text(json.dumps({"class_names": ["0", "1", "2"], "prompt_template": "{name}"}))
    out = tmp_path / "exported"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    meta = json.loads((out / "dpldm.json").read_text())
    assert not meta.get("class_names") and "derived from the private labels" in meta["omitted"][0]
    assert "omitted classes.json" in capsys.readouterr().out
    pipeline_meta = {"class_names": ["a", "b", "c"]}
    (run / "classes.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "prompt_template": "{name}"}))
    assert public_classes(run, cfg, pipeline_meta) == {}              # the pipeline's own names: kept as they are
    cfg.model.class_names = ["zero", "one", "two"]
    assert public_classes(run, cfg, pipeline_meta)["class_names"] == ["zero", "one", "two"]
