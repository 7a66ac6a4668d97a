"""`dpldm data inspect` says its outputs are private and writes no default grid for a set marked private."""
import json

import pytest
import torch

from dpldm.cli import main as cli
from dpldm.data.inspect import PRIVATE_OUTPUT_WARNING
from dpldm.eval.shards import write_shards


@pytest.fixture
def shards(tmp_path):
    write_shards(torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 1, 2, 2, 2]), tmp_path / "set")
    return tmp_path / "set"


def test_inspect_warns_that_its_outputs_are_private(shards, capsys):
    assert cli(["data", "inspect", str(shards)]) == 0
    out, err = capsys.readouterr()
    assert PRIVATE_OUTPUT_WARNING in err and len(PRIVATE_OUTPUT_WARNING.splitlines()) == 1
    assert "never publish" in PRIVATE_OUTPUT_WARNING
    assert "0: 1, 1: 2, 2: 3" in out and (shards / "inspect_grid.png").exists()   # unmarked set: as before


def test_a_set_marked_private_gets_no_default_grid(shards, tmp_path, capsys):
    (shards / "dataset.json").write_text(json.dumps({"source": "x", "private": True}))
    assert cli(["data", "inspect", str(shards)]) == 0
    out, err = capsys.readouterr()
    assert not (shards / "inspect_grid.png").exists() and "not written: the set is marked private" in out
    assert PRIVATE_OUTPUT_WARNING in err
    assert cli(["data", "inspect", str(shards), "--grid", str(tmp_path / "private" / "g.png")]) == 0
    assert (tmp_path / "private" / "g.png").exists()                             # explicit path: written


def test_pack_private_marks_the_set_and_inspect_respects_it(tmp_path, capsys):
    out = tmp_path / "priv"
    assert cli(["data", "pack", "mnist", "--out", str(out), "--limit", "20", "--shard-size", "10", "--private"]) == 0
    assert json.loads((out / "dataset.json").read_text())["private"] is True
    assert cli(["data", "inspect", str(out)]) == 0
    assert not (out / "inspect_grid.png").exists() and "marked private" in capsys.readouterr().out


def test_a_truncated_shard_is_reported_with_the_samples_it_lost(tmp_path, capsys):
    """Issue 14 §6: a shard cut mid-file used to read as "samples: 5, unreadable: 1" with the lost samples
    vanishing from the report; inspect now compares with the pack manifest (count and per-shard counts)."""
    out = tmp_path / "set"
    assert cli(["data", "pack", "mnist", "--out", str(out), "--limit", "20", "--shard-size", "10"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["shard_counts"] == {"shard-000000.tar": 10, "shard-000001.tar": 10}
    capsys.readouterr()
    assert cli(["data", "inspect", str(out)]) == 0
    assert "expected: 20 (dataset.json): all read" in capsys.readouterr().out
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2 + 100])   # cut mid-file
    assert cli(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    read = int(next(ln for ln in text.splitlines() if ln.startswith("samples:")).split()[1])
    assert read < 20 and f"MISSING: {20 - read} samples not read" in text
    assert f"TRUNCATED: {shard}: read {read - 10} of the 10 samples" in text


def test_shards_without_a_manifest_say_their_count_cannot_be_checked(shards, capsys):
    assert cli(["data", "inspect", str(shards)]) == 0
    assert "expected: unknown (no dataset.json" in capsys.readouterr().out
