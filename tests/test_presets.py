"""Every preset in configs/ loads and resolves against the typed config; DeepSpeed presets are valid JSON
and named files exist."""
import json
from pathlib import Path

import pytest

from dpldm.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"quickstart", "pretrain_fashion", "mnist", "cifar10", "celeba256", "txt2img"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_resolves(preset):
    cfg = load_config(preset)
    if cfg.distributed.deepspeed:
        ds = Path(__file__).resolve().parent.parent / cfg.distributed.deepspeed
        assert ds.exists(), f"{preset.name} names missing DeepSpeed config {ds}"
        json.loads(ds.read_text())
    if cfg.adapter.name_pattern:
        import re
        re.compile(cfg.adapter.name_pattern)
    assert cfg.privacy.delta < 1e-4 and cfg.privacy.target_epsilon > 0


def test_base_chain_overrides_fields():
    cfg = load_config(CONFIGS / "mnist.yaml")
    assert cfg.privacy.expected_batch_size == 2048           # from mnist.yaml
    assert cfg.adapter.kind == "loda"                        # inherited from quickstart.yaml
    assert cfg.privacy.clip_groups == ["attn2"]             # inherited: per-group clipping
    assert cfg.model.class_names == []                       # inherited: label-index prompts
