"""The U-Net class of an exported LoDA pipeline: a UNet2DConditionModel carrying adapter layers that cannot be
merged into its weights (y = W(x) + scale·B(σ(A(x))) with a nonlinear σ), saved and loaded whole.

    unet/config.json                          "_class_name": "AdaptedUNet2DConditionModel"
    unet/diffusion_pytorch_model.safetensors  base weights + loda_A / loda_B weights
    unet/dpldm_adapter.json                   AdapterConfig fields + "layers": {module: rank, σ, scale}
    unet/adapted_unet.py, unet/loda.py        this file and loda.py (written by save_pretrained)

This module and loda.py import only the standard library, torch, diffusers and safetensors (loda.py relatively,
as `.loda`), never another dpldm module. So an export loads in plain diffusers without dpldm installed:
model_index.json names the component ["adapted_unet", "AdaptedUNet2DConditionModel"] and
`DiffusionPipeline.from_pretrained(EXPORT, trust_remote_code=True)` imports these two files from unet/.
Inside dpldm, `dpldm.models.pipeline.load_pipeline` uses this class directly. See docs/adapters.md.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from .loda import AdaptedLayer, wrap_loda

ADAPTER_JSON = "dpldm_adapter.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
MODULE_NAME = "adapted_unet"        # the component's library name in model_index.json
CODE_FILES = (Path(__file__).with_name("adapted_unet.py"), Path(__file__).with_name("loda.py"))


def adapted_layers(unet: torch.nn.Module) -> dict[str, dict]:
    """{module name: {"rank", "nonlinearity", "scale"}} of the LoDA layers in `unet` (the record
    from_pretrained rebuilds them from)."""
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, AdaptedLayer):
            if m.prefix != "loda":
                raise ValueError(f"{name}: only LoDA layers are saved unmerged; {m.prefix} layers merge")
            out[name] = {"rank": m.rank, "nonlinearity": m.nonlinearity, "scale": m.scale}
    return out


class AdaptedUNet2DConditionModel(UNet2DConditionModel):
    """A U-Net with unmergeable LoDA layers; `dpldm_adapter` is the content of dpldm_adapter.json."""

    # diffusers names a custom component in model_index.json by its class's __module__. Imported by diffusers from an
    # export that is "diffusers_modules.local.adapted_unet" (inside dpldm "dpldm.models.adapted_unet"), which a later
    # from_pretrained cannot find: a pipeline loaded from an export and re-saved with save_pretrained would not load
    # again. The file this class ships as, in unet/, is what every loader finds.
    __module__ = MODULE_NAME

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        record = json.loads((folder / ADAPTER_JSON).read_text())
        if not isinstance(record.get("layers"), dict):
            raise ValueError(f"{folder / ADAPTER_JSON}: no 'layers' record (written by an older dpldm "
                             "export); export the run again")
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
        unet.__class__ = cls
        for name, spec in record["layers"].items():
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, wrap_loda(getattr(parent, child), int(spec["rank"]),
                                             str(spec["nonlinearity"]), float(spec["scale"])))
        unet.dpldm_adapter = record
        unet.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
        if kwargs.get("torch_dtype") is not None:
            unet.to(kwargs["torch_dtype"])
        return unet.eval().requires_grad_(False)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' files, then dpldm_adapter.json and the code that loads them (this file and loda.py)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        record = {**getattr(self, "dpldm_adapter", {}), "layers": adapted_layers(self)}
        (folder / ADAPTER_JSON).write_text(json.dumps(record, indent=2) + "\n")
        for src in CODE_FILES:
            if src.resolve() != (folder / src.name).resolve():
                shutil.copyfile(src, folder / src.name)


def component_entry() -> list[str]:
    """The model_index.json entry under which diffusers finds this class in unet/ (trust_remote_code=True)."""
    return [MODULE_NAME, AdaptedUNet2DConditionModel.__name__]
