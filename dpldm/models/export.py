"""`dpldm export RUN --out DIR`: a plain-diffusers pipeline folder with the run's adapter applied.

- full / attention: the trained tensors are ordinary U-Net weights; they replace the pretrained ones.
- lora (and LoDA with nonlinearity=identity): merged into the weights (W + scale·B·A), so unet/ is
  a standard UNet2DConditionModel; the
  unmerged low-rank factors are also written as `pytorch_lora_weights.safetensors` for
  `pipe.load_lora_weights` on top of the pretrained pipeline.
- loda: W(x) + B(σ(A(x))) has no linear fold (σ is nonlinear), so unet/ holds
  `AdaptedUNet2DConditionModel` (dpldm/models/adapted_unet.py) together with its code (adapted_unet.py,
  loda.py): plain `diffusers.DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` loads it
  without dpldm installed.
See docs/models.md.

Class names: an export is a release, so it carries only class names that are public — those named in the
run's config (model.class_names) or the pretrained pipeline's own. A run's classes.json written from the
private labels alone ("0".."K-1": it reveals how many classes the private set has) is left out, and the
export's dpldm.json says so under "omitted" (issue 11 §9).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpldm.config import load_config
from dpldm.errors import DpldmError
from dpldm.log import log
from dpldm.models.adapted_unet import AdaptedUNet2DConditionModel
from dpldm.models.adapters import adapter_config_of, load_adapter, merge_adapter
from dpldm.models.loda import AdaptedLayer
from dpldm.models.lora import DIFFUSERS_LORA_FILE as LORA_FILE
from dpldm.models.lora import lora_state_dict_for_diffusers
from dpldm.models.pipeline import Components, load_pipeline, save_pipeline
from dpldm.run_dir import RunDir


def load_plain_weights(unet: torch.nn.Module, adapter_dir: Path) -> int:
    """Copy tensors named like U-Net parameters (full / attention adapters) into `unet`; returns count."""
    files = sorted(adapter_dir.glob("*.safetensors"))
    if not files:
        raise DpldmError(f"{adapter_dir}: no .safetensors adapter weights found")
    own = unet.state_dict()
    n = 0
    for f in files:
        for name, tensor in load_file(str(f)).items():
            key = name.removeprefix("unet.")
            if key not in own:
                raise DpldmError(f"{f}: tensor {name} is not a U-Net weight (expected full/attention weights)")
            if own[key].shape != tensor.shape:
                raise DpldmError(f"{f}: {name} has shape {tuple(tensor.shape)}; the U-Net expects "
                                 f"{tuple(own[key].shape)}")
            with torch.no_grad():
                own[key].copy_(tensor.to(own[key].dtype))
            n += 1
    return n


def _lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The unmerged LoRA factors in the diffusers/peft key layout (`unet.<module>.lora_A.weight`)."""
    return {k: v.detach().cpu().contiguous() for k, v in lora_state_dict_for_diffusers(unet).items()}


def public_classes(run_dir: Path, cfg, pipeline_meta: dict) -> dict:
    """The export's class_names/prompt_template from public sources only: the run config's class names, else
    the pretrained pipeline's. A classes.json that matches neither was derived from the private labels: it is
    omitted and recorded under "omitted"."""
    if cfg.model.class_names:
        return {"class_names": list(cfg.model.class_names), "prompt_template": cfg.model.prompt_template}
    trained = RunDir(run_dir).classes
    if not trained.is_file():
        return {}
    written = json.loads(trained.read_text())
    names = list(written.get("class_names") or [])
    public = written.get("source") in ("config", "pipeline") if "source" in written else \
        names == list(pipeline_meta.get("class_names") or [])    # older runs: compare with the pipeline's
    if names and public:
        return {}                                      # public names: already in the config or the pipeline meta
    return {"omitted": [f"classes.json of {run_dir.name}: {len(names)} class names derived from the private "
                        "labels (not a public name list); set model.class_names to export public names"]}


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    cfg_file = RunDir(run_dir).config
    if not cfg_file.is_file():
        raise DpldmError(f"{run_dir}: no config.yaml; expected a run directory written by `dpldm finetune`")
    cfg = load_config(cfg_file)
    adapter_dir = RunDir(run_dir).adapter
    if not adapter_dir.is_dir():
        raise DpldmError(f"{run_dir}: no adapter/ folder; has the run written a checkpoint yet?")
    comps = load_pipeline(cfg.model.pretrained)
    kind = cfg.adapter.kind
    lora = None
    if not (adapter_dir / "adapter_config.json").is_file() and kind in ("full", "attention"):
        load_plain_weights(comps.unet, adapter_dir)      # bare U-Net tensors
    else:
        load_adapter(comps.unet, adapter_dir)           # attaches the adapter its config names
        layers = [m for m in comps.unet.modules() if isinstance(m, AdaptedLayer)]
        if all(m.mergeable for m in layers):
            if layers:
                lora = _lora_state_dict(comps.unet)
            comps.unet = merge_adapter(comps.unet, inplace=True)
        else:
            adapter = dataclasses.asdict(adapter_config_of(comps.unet))
            comps.unet.__class__ = AdaptedUNet2DConditionModel
            comps.unet.dpldm_adapter = adapter
    comps.unet.eval().requires_grad_(False)
    comps.meta = {**comps.meta, "source": f"dpldm export {run_dir} (adapter {kind}, base {cfg.model.pretrained})"}
    comps.meta.update(public_classes(run_dir, cfg, comps.meta))
    save_pipeline(Components(comps.vae, comps.unet, comps.text_encoder, comps.tokenizer, comps.scheduler,
                             comps.meta), out)
    if lora is not None:
        save_file(lora, str(out / LORA_FILE))
    return out


def main(args) -> int:
    out = export_run(args.run, args.out)
    custom = (out / "unet" / "adapted_unet.py").is_file()
    log(f"dpldm export: wrote {out} (load with diffusers.DiffusionPipeline.from_pretrained"
        + (", trust_remote_code=True: unet/ ships the adapted U-Net's code)" if custom else ")"))
    meta = json.loads((out / "dpldm.json").read_text())
    for what in meta.get("omitted", []):
        log(f"dpldm export: omitted {what}")
    return 0
