"""LoRA: the linear special case of LoDA (no nonlinearity), with diffusers/peft key names.

    y = W(x) + scale · B(A(x))       A: W's kernel/stride/padding → r channels, B: 1×1 → out

Our own module rather than peft's: peft's LoRA layers under opacus' per-sample hooks can leave the LoRA
weights unmoved by the optimizer step, and ours run under torch.func per-example gradients (docs/adapters.md).
The submodules are named `lora_A` / `lora_B`, so `lora_state_dict_for_diffusers` only prefixes `unet.` and
folds `scale` into B: diffusers' `load_lora_weights` then builds the same peft LoRA layers (lora_alpha = r,
i.e. peft scaling 1) and reproduces our outputs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dpldm.errors import DpldmError
from dpldm.models.loda import AdaptedLayer, LoDAConv2d, LoDALinear

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"   # the name load_lora_weights(dir) looks for


class LoRAConv2d(LoDAConv2d):
    """Conv LoRA: frozen nn.Conv2d + scale·B(A(x)); mergeable into W since B is 1×1."""
    prefix = "lora"


class LoRALinear(LoDALinear):
    """Linear LoRA: frozen nn.Linear + scale·B(A(x))."""
    prefix = "lora"


def wrap_lora(base: nn.Module, rank: int, scale: float) -> AdaptedLayer:
    """The LoRA-adapted version of a plain nn.Conv2d / nn.Linear (sharing its parameters)."""
    if isinstance(base, nn.Conv2d):
        return LoRAConv2d.from_base(base, rank, "identity", scale)
    if isinstance(base, nn.Linear):
        return LoRALinear.from_base(base, rank, "identity", scale)
    raise DpldmError(f"LoRA adapts nn.Conv2d and nn.Linear layers only; got {type(base).__name__}")


def _peft_compatible(name: str, layer: AdaptedLayer) -> None:
    if not layer.mergeable:
        raise DpldmError(f"lora export: {name} has a LoDA adapter with nonlinearity '{layer.nonlinearity}', "
                         "which diffusers' LoRA format cannot express (only linear adapters can)")
    if isinstance(layer, nn.Conv2d) and (tuple(layer.dilation) != (1, 1) or layer.padding_mode != "zeros"
                                         or layer.groups != 1):
        raise DpldmError(f"lora export: {name} is a conv with dilation/groups/padding_mode that peft's "
                         "LoRA conv does not reproduce")


def lora_state_dict_for_diffusers(unet: nn.Module) -> dict[str, torch.Tensor]:
    """`unet.<module path>.lora_A.weight` / `.lora_B.weight` tensors (scale folded into B) that
    `StableDiffusionPipeline.load_lora_weights` accepts. Works for LoRA and identity-σ LoDA."""
    out: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, AdaptedLayer):
            _peft_compatible(name, module)
            out[f"unet.{name}.lora_A.weight"] = module.adapter_a.weight.detach().clone().contiguous()
            out[f"unet.{name}.lora_B.weight"] = (module.scale * module.adapter_b.weight.detach()).contiguous()
    if not out:
        raise DpldmError("lora export: the U-Net has no LoRA/LoDA adapter layers (attention/full adapters "
                         "change W itself: export them with merge_adapter)")
    return out


def save_lora_for_diffusers(unet: nn.Module, directory: str | Path) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors`; load with `pipe.load_lora_weights(directory)`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DIFFUSERS_LORA_FILE
    tmp = path.with_suffix(".tmp")
    save_file({k: v.cpu() for k, v in lora_state_dict_for_diffusers(unet).items()}, str(tmp))
    tmp.replace(path)
    return path
