"""Which U-Net parameters DP fine-tuning trains: LoDA, LoRA, attention-only or full.

    names = attach_adapter(unet, cfg.adapter)        # in place; freezes the rest
    params = trainable_named_parameters(unet)        # {name: Parameter}, stable order
    print(parameter_table(unet))
    save_adapter(unet, cfg.adapter, run / "adapter"); load_adapter(fresh_unet, run / "adapter")
    plain = merge_adapter(unet)                      # plain diffusers U-Net (not for nonlinear LoDA)

Targeting (loda/lora): module types (`conv`, `linear`), a regex searched in module names
(`name_pattern`), and U-Net levels (`levels`: `down`, `mid`, `up`, an index like `down.1` /
`up.0`, or `other` = conv_in, time embedding, conv_out). attention: the Transformer2DModel
blocks (and bare Attention modules) at the selected levels, filtered by `name_pattern`.
full: every U-Net parameter. See docs/adapters.md.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections import OrderedDict
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from dpldm import __version__
from dpldm.config import AdapterConfig, ConfigError, config_from_dict
from dpldm.errors import DpldmError
from dpldm.models.loda import NONLINEARITIES, AdaptedLayer, wrap_loda
from dpldm.models.lora import lora_state_dict_for_diffusers, save_lora_for_diffusers, wrap_lora

__all__ = ["attach_adapter", "trainable_named_parameters", "count_parameters", "parameter_table",
           "save_adapter", "load_adapter", "merge_adapter", "lora_state_dict_for_diffusers",
           "save_lora_for_diffusers", "adapter_config_of", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_MARK = "dpldm_adapter_config"   # attribute set on an adapted U-Net
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)(\.|$)|^(mid_block)(\.|$)")
_LEVEL_NAMES = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}


# -- levels ------------------------------------------------------------------------------------

def block_of(name: str) -> str:
    """The U-Net block a module/parameter name lies in: 'down_blocks.0', 'mid_block', ... or 'other'."""
    m = _BLOCK_RE.match(name)
    if not m:
        return "other"
    return f"{m.group(1)}.{m.group(2)}" if m.group(1) else "mid_block"


def _level_of(name: str) -> tuple[str, int | None]:
    block = block_of(name)
    if block == "other" or block == "mid_block":
        return ("other" if block == "other" else "mid"), None
    kind, idx = block.split(".")
    return _LEVEL_NAMES[kind], int(idx)


def _level_filter(unet: nn.Module, levels: list[str]):
    """A predicate on names for `adapter.levels`; rejects unknown specs and out-of-range indices."""
    counts = {"down": len(getattr(unet, "down_blocks", [])), "up": len(getattr(unet, "up_blocks", []))}
    wanted: list[tuple[str, int | None]] = []
    for spec in levels:
        m = re.fullmatch(r"(down|mid|up|other)(?:\.(\d+))?", str(spec))
        if not m or (m.group(2) is not None and m.group(1) in ("mid", "other")):
            raise DpldmError(f"adapter.levels: {spec!r} is not one of down, mid, up, other, down.N, up.N")
        idx = int(m.group(2)) if m.group(2) is not None else None
        if idx is not None and idx >= counts[m.group(1)]:
            raise DpldmError(f"adapter.levels: {spec!r} but the U-Net has {counts[m.group(1)]} "
                             f"{m.group(1)} blocks (0..{counts[m.group(1)] - 1})")
        wanted.append((m.group(1), idx))

    def selected(name: str) -> bool:
        level, idx = _level_of(name)
        return any(level == w and (wi is None or wi == idx) for w, wi in wanted)
    return selected


def _validate(cfg: AdapterConfig) -> re.Pattern | None:
    if cfg.kind not in ("loda", "lora", "attention", "full"):
        raise DpldmError(f"adapter.kind must be one of loda, lora, attention, full; got {cfg.kind!r}")
    if cfg.kind in ("loda", "lora"):
        if not isinstance(cfg.rank, int) or cfg.rank < 1:
            raise DpldmError(f"adapter.rank must be an int >= 1; got {cfg.rank!r}")
        if cfg.nonlinearity not in NONLINEARITIES:
            raise DpldmError(f"adapter.nonlinearity must be one of {', '.join(NONLINEARITIES)}; "
                             f"got {cfg.nonlinearity!r}")
        bad = [t for t in cfg.module_types if t not in ("conv", "linear")]
        if bad or not cfg.module_types:
            raise DpldmError(f"adapter.module_types must be a non-empty subset of [conv, linear]; "
                             f"got {cfg.module_types!r}")
        if not torch.isfinite(torch.tensor(float(cfg.scale))):
            raise DpldmError(f"adapter.scale must be a finite number; got {cfg.scale!r}")
    try:
        return re.compile(cfg.name_pattern) if cfg.name_pattern else None
    except re.error as e:
        raise DpldmError(f"adapter.name_pattern {cfg.name_pattern!r} is not a valid regex: {e}") from None


def _describe(cfg: AdapterConfig) -> str:
    return (f"adapter.kind={cfg.kind} module_types={cfg.module_types} "
            f"name_pattern={cfg.name_pattern!r} levels={cfg.levels}")


# -- attach ------------------------------------------------------------------------------------

def _attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Transformer2DModel blocks plus bare Attention modules not inside one."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in unet.named_modules():
        if isinstance(module, (Transformer2DModel, Attention)) and \
                not any(name.startswith(prev + ".") for prev, _ in found):
            found.append((name, module))
    return found


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def attach_adapter(unet: nn.Module, adapter_cfg: AdapterConfig) -> list[str]:
    """Freeze the whole U-Net, then add/unfreeze the configured adapter in place.
    Returns the trainable parameter names; raises DpldmError if the targeting selects nothing."""
    if getattr(unet, _MARK, None) is not None:
        raise DpldmError("attach_adapter: this U-Net already has a dpldm adapter "
                         f"({getattr(unet, _MARK).kind}); load a fresh base U-Net")
    pattern = _validate(adapter_cfg)
    in_levels = _level_filter(unet, adapter_cfg.levels)
    unet.requires_grad_(False)
    kind = adapter_cfg.kind

    if kind in ("loda", "lora"):
        types = tuple(t for t, on in ((nn.Conv2d, "conv" in adapter_cfg.module_types),
                                      (nn.Linear, "linear" in adapter_cfg.module_types)) if on)
        targets = [(n, m) for n, m in unet.named_modules()
                   if type(m) in types and in_levels(n) and (pattern is None or pattern.search(n))]
        if not targets:
            raise DpldmError(f"{_describe(adapter_cfg)} selects no layer of the U-Net")
        for name, module in targets:
            if kind == "loda":
                new = wrap_loda(module, adapter_cfg.rank, adapter_cfg.nonlinearity, adapter_cfg.scale)
            else:
                new = wrap_lora(module, adapter_cfg.rank, adapter_cfg.scale)
            new.adapter_a.requires_grad_(True)
            new.adapter_b.requires_grad_(True)
            _set_submodule(unet, name, new)
    elif kind == "attention":
        blocks = [(n, m) for n, m in _attention_modules(unet) if in_levels(n)]
        selected = 0
        for bname, block in blocks:
            for pname, p in block.named_parameters():
                owner = f"{bname}.{pname}".rpartition(".")[0]
                if pattern is None or pattern.search(owner):
                    p.requires_grad_(True)
                    selected += 1
        if not selected:
            raise DpldmError(f"{_describe(adapter_cfg)} selects no attention parameter of the U-Net")
    else:  # full
        unet.requires_grad_(True)
    setattr(unet, _MARK, copy.deepcopy(adapter_cfg))
    return list(trainable_named_parameters(unet))


def adapter_config_of(unet: nn.Module) -> AdapterConfig | None:
    """The AdapterConfig attach_adapter/load_adapter used on this U-Net, or None."""
    return getattr(unet, _MARK, None)


def trainable_named_parameters(module: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """The parameters with requires_grad, in registration order (stable across runs)."""
    return OrderedDict((n, p) for n, p in module.named_parameters() if p.requires_grad)


# -- counting ----------------------------------------------------------------------------------

def _adapter_param_ids(unet: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in unet.modules():
        if isinstance(m, AdaptedLayer):
            ids.update(id(p) for p in m.adapter_a.parameters())
            ids.update(id(p) for p in m.adapter_b.parameters())
    return ids


def count_parameters(unet: nn.Module) -> tuple[int, int]:
    """(trainable parameters, parameters of the base U-Net without adapter layers)."""
    extra = _adapter_param_ids(unet)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    base = sum(p.numel() for p in unet.parameters() if id(p) not in extra)
    return trainable, base


def parameter_table(unet: nn.Module) -> str:
    """Trainable parameters per U-Net block and in total, with % of the base U-Net's count."""
    extra = _adapter_param_ids(unet)
    rows: "OrderedDict[str, list[int]]" = OrderedDict()
    for name, p in unet.named_parameters():
        row = rows.setdefault(block_of(name), [0, 0])
        row[0] += p.numel() if p.requires_grad else 0
        row[1] += p.numel() if id(p) not in extra else 0
    trainable, base = count_parameters(unet)
    cfg = adapter_config_of(unet)
    title = f"adapter: {cfg.kind}" + (f" (rank {cfg.rank}, {cfg.nonlinearity})" if cfg and cfg.kind == "loda"
                                      else f" (rank {cfg.rank})" if cfg and cfg.kind == "lora" else "") \
        if cfg else "adapter: none"
    lines = [title, f"{'block':<16}{'trainable':>12}{'base':>12}{'% of base':>11}"]
    order = sorted(rows, key=lambda b: (b != "other", b.startswith("up"), b.startswith("mid"), b))
    for block in order:
        t, b = rows[block]
        lines.append(f"{block:<16}{t:>12,}{b:>12,}{100 * t / max(b, 1):>10.2f}%")
    lines.append(f"{'total':<16}{trainable:>12,}{base:>12,}{100 * trainable / max(base, 1):>10.2f}%")
    return "\n".join(lines)


# -- save / load -------------------------------------------------------------------------------

def save_adapter(unet: nn.Module, adapter_cfg: AdapterConfig, directory: str | Path) -> Path:
    """Write `adapter.safetensors` (trainable parameters only) and `adapter_config.json`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in trainable_named_parameters(unet).items()}
    if not tensors:
        raise DpldmError("save_adapter: the U-Net has no trainable parameters (attach_adapter first)")
    trainable, base = count_parameters(unet)
    meta = {"kind": adapter_cfg.kind, "adapter": dataclasses.asdict(adapter_cfg), "dpldm_version": __version__,
            "trainable_parameters": trainable, "base_parameters": base}
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "dpldm_adapter_kind": adapter_cfg.kind})
    tmp.replace(directory / ADAPTER_WEIGHTS)
    tmp = directory / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(directory / ADAPTER_CONFIG)
    return directory


def _read_config(path: Path) -> AdapterConfig:
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DpldmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("adapter"), dict):
        raise DpldmError(f"{path}: expected an object with an 'adapter' mapping (AdapterConfig fields)")
    try:
        return config_from_dict({"adapter": meta["adapter"]}).adapter
    except ConfigError as e:
        raise DpldmError(f"{path}: {e}") from None


def _short(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def load_adapter(unet: nn.Module, directory: str | Path) -> AdapterConfig:
    """Attach the adapter described by `directory/adapter_config.json` to a base U-Net and load
    its weights; a U-Net already carrying the same adapter config just gets the weights."""
    directory = Path(directory)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / f).is_file():
            raise DpldmError(f"{directory}: no {f} (expected a folder written by save_adapter)")
    cfg = _read_config(directory / ADAPTER_CONFIG)
    current = adapter_config_of(unet)
    if current is None:
        attach_adapter(unet, cfg)
    elif current != cfg:
        raise DpldmError(f"{directory}: the U-Net already has a different adapter ({current.kind}); "
                         "load into a fresh base U-Net")
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    params = trainable_named_parameters(unet)
    missing, unexpected = set(params) - set(tensors), set(tensors) - set(params)
    if missing or unexpected:
        raise DpldmError(f"{directory / ADAPTER_WEIGHTS} does not match this U-Net with {_describe(cfg)}: "
                         f"missing keys [{_short(missing)}], unexpected keys [{_short(unexpected)}]")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise DpldmError(f"{directory / ADAPTER_WEIGHTS}: {name} has shape {tuple(tensors[name].shape)}, "
                             f"the U-Net expects {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    return cfg


# -- merge / export ----------------------------------------------------------------------------

def merge_adapter(unet: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain diffusers U-Net (no dpldm modules) with the same outputs: LoRA and identity-σ LoDA
    fold scale·B∘A into W; attention/full already change W. Nonlinear LoDA cannot merge: DpldmError
    (`dpldm export` ships it as an AdaptedUNet2DConditionModel with its code, see docs/adapters.md). All
    parameters of the result are frozen (requires_grad False)."""
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, AdaptedLayer)]
    for name, m in layers:
        if not m.mergeable:
            raise DpldmError(f"merge_adapter: LoDA with nonlinearity '{m.nonlinearity}' (at {name}) is not "
                             "linear and cannot be merged into plain diffusers weights; `dpldm export` writes it "
                             "with its code (diffusers loads it with trust_remote_code=True), or train with "
                             "adapter.nonlinearity=identity")
    out = unet if inplace else copy.deepcopy(unet)
    for name, _ in layers:
        _set_submodule(out, name, out.get_submodule(name).merged())
    out.requires_grad_(False)
    if hasattr(out, _MARK):
        delattr(out, _MARK)
    return out
