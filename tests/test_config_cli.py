"""Typed configs (defaults, presets, dotted overrides, one-line errors naming the key) and the CLI:
`dpldm <verb> --help` works for every verb and sub-verb."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dpldm.cli import build_parser
from dpldm.config import (Config, ConfigError, config_from_dict, load_config, save_config, to_dict)
from dpldm.errors import DpldmError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["privacy.target_epsilon=1", "data.num_workers=2", "data.transform=pad",
                             "model.unet_block_channels=[32, 64]", "privacy.delta=1e-6",
                             "privacy.noise_multiplier=null", "output.dir=runs/x", "optim.lr=3"])
    assert cfg.privacy.target_epsilon == 1.0 and isinstance(cfg.privacy.target_epsilon, float)
    assert cfg.data.num_workers == 2 and cfg.data.transform == "pad"
    assert cfg.model.unet_block_channels == [32, 64] and cfg.privacy.delta == 1e-6
    assert cfg.privacy.noise_multiplier is None and cfg.output.dir == "runs/x" and cfg.optim.lr == 3.0
    assert Config().data.shuffle_buffer == 2000 and Config().data.on_error == "skip"


@pytest.mark.parametrize("override,names", [
    ("data.shuffle_bufer=5", "data.shuffle_bufer"),           # unknown key
    ("nosuch=1", "nosuch"),                                   # unknown top-level key
    ("data.num_workers=two", "data.num_workers"),             # wrong type
    ("privacy.enabled=3", "privacy.enabled"),                 # bool expected
    ("model.unet_block_channels=[32, x]", "model.unet_block_channels[1]"),
    ("data.transform=stretch", "data.transform"),             # bad choice
    ("data.on_error=ignore", "data.on_error"),
    ("data.num_workers.x=1", "data.num_workers"),             # value, not a section
    ("data=3", "data"),                                       # section, not a value
    ("no_equals_sign", "no_equals_sign"),
])
def test_override_errors_name_the_key(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert names in msg and "\n" not in msg and isinstance(e.value, DpldmError)


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError, match="data.transform must be one of resize, center_crop, pad; got 'stretch'"):
        load_config(None, ["data.transform=stretch"])


def test_presets_with_base_and_save_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  batch_size: 16\n  transform: center_crop\nseed: 4\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ndata:\n  batch_size: 8\n")
    cfg = load_config(tmp_path / "child.yaml", ["seed=5"])
    assert (cfg.data.batch_size, cfg.data.transform, cfg.seed) == (8, "center_crop", 5)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert to_dict(again) == to_dict(cfg) and config_from_dict(to_dict(cfg)) == cfg
    (tmp_path / "bad.yaml").write_text("data:\n  shuffle_buffer: lots\n")
    with pytest.raises(ConfigError, match="data.shuffle_buffer expects int"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_presets_load(preset):
    cfg = load_config(REPO / "configs" / preset)
    assert isinstance(cfg, Config)


def _verb_paths(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths.extend(_verb_paths(sub, prefix + (name,)))
    return paths


VERBS = _verb_paths(build_parser())


def test_every_documented_verb_exists():
    top = {p[0] for p in VERBS}
    assert top >= {"data", "pretrain", "encode", "finetune", "sample", "export", "evaluate", "privacy",
                   "audit", "quickstart"}
    assert ("data", "pack") in VERBS and ("data", "inspect") in VERBS and ("privacy", "noise") in VERBS


@pytest.mark.parametrize("path", VERBS, ids=[" ".join(p) for p in VERBS])
def test_help_of_every_verb_exits_zero(path, capsys):
    from dpldm.cli import main
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert "usage: dpldm " + " ".join(path) in capsys.readouterr().out


def test_console_entry_point_help():
    exe = Path(sys.executable).parent / "dpldm"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dpldm.cli"]
    out = subprocess.run(cmd + ["data", "pack", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--shard-size" in out.stdout
    bad = subprocess.run(cmd + ["data", "pack"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--out" in bad.stderr


def test_every_config_field_is_documented_where_it_is_declared():
    """Issue 14 §5: each field has a comment beside or above its declaration; `config show` prints it."""
    from dpldm.config import field_help
    helps, cfg = field_help(), Config()
    keys = [s.name for s in dataclasses.fields(cfg)]
    keys += [f"{s}.{f.name}" for s in keys if dataclasses.is_dataclass(getattr(cfg, s))
             for f in dataclasses.fields(getattr(cfg, s))]
    assert len(keys) > 80
    missing = [k for k in keys if not helps.get(k)]
    assert not missing, f"fields without help: {missing}"


def test_config_show_prints_the_resolved_preset_with_help(capsys, tmp_path):
    """`dpldm config show PRESET overrides` prints YAML that reads back as the resolved config."""
    from dpldm.cli import main
    assert main(["config", "show", str(REPO / "configs" / "mnist.yaml"), "privacy.target_epsilon=2.5"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(REPO / "configs" / "mnist.yaml", ["privacy.target_epsilon=2.5"])
    (tmp_path / "shown.yaml").write_text(out)
    assert to_dict(load_config(tmp_path / "shown.yaml")) == to_dict(cfg)
    assert "  target_epsilon: 2.5  # the budget" in out and "\nprivacy:  # DP-SGD and its accounting" in out
    assert "max_grad_norm: 0.01  # C: each example's gradient is clipped" in out
