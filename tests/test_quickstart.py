"""The embedded default end to end (`dpldm quickstart --fast`, the CI smoke version): every stage runs through
the real CLI and the report holds the DP-LoDA runs and the DP-SGD baseline side by side at eps = 1 and 10."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpldm.config import load_config


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    out = tmp_path / "qs"
    dpldm = Path(sys.executable).parent / "dpldm"
    proc = subprocess.run([str(dpldm), "quickstart", "--fast", "--out", str(out)], capture_output=True, text=True,
                          timeout=1500, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    rows = report["rows"]
    lodas = [r for r in rows if r["method"].startswith("dpldm DP-LoDA")]
    dpsgd = [r for r in rows if r["method"].startswith("DP-SGD")]
    assert sorted(round(r["epsilon"]) for r in lodas) == [1, 10]
    assert sorted(round(r["epsilon"]) for r in dpsgd) == [1, 10]
    for r in lodas + dpsgd:
        assert r["private"] and r["sampling"] == "poisson" and r["delta"] == 1e-5
        assert 0.0 <= r["acc_mean"] <= 1.0
    for eps in (10, 1):
        ledger = json.loads((out / f"dp-loda-eps{eps}" / "privacy.json").read_text())
        assert ledger["private"] and ledger["epsilon"] <= eps * (1 + 1e-6) and ledger["steps"] > 0
        assert (out / f"dp-loda-eps{eps}" / "samples" / "grid.png").exists()
        # the adapter rank by budget (chosen on the public proxy): 2 where the noise dominates
        cfg = load_config(out / f"dp-loda-eps{eps}" / "config.yaml")
        assert cfg.adapter.rank == (2 if eps == 1 else 4)
        assert cfg.optim.decay == "cosine"
    nodp = [r for r in rows if r["method"].startswith("No DP")]
    assert nodp and nodp[0]["private"] is False
    # the synthetic and public rows train on affine views (chosen on the proxy); the real-data references do not
    for r in rows:
        views = r["method"].startswith(("dpldm DP-LoDA", "pretrained only", "CNN on the public data"))
        assert ("affine views" in (r.get("notes") or "")) == views, r
        smoothed = views or r["method"].startswith("DP-SGD")     # DP-SGD too: it helps DP-SGD on public data
        assert ("label smoothing 0.1" in (r.get("notes") or "")) == smoothed, r
        assert r.get("label_smoothing", 0.0) == (0.1 if smoothed else 0.0), r
    assert (out / "report" / "privacy_utility.png").exists()
    md = (out / "report" / "report.md").read_text()
    assert "NOT PRIVATE" in md and "DP-LoDA (paper)" in md
    assert md.count("the classifier trained on DP-LoDA synthetic data") == 2   # verdict at eps = 10 and 1
    assert "random affine views of each batch; the DP-SGD and No-DP classifiers on the real images" in md
    assert "Every classifier but No DP trains with label smoothing 0.1, DP-SGD included" in md
    # a second run reuses every stage (resume by re-running) and writes the same table
    again = subprocess.run([str(dpldm), "quickstart", "--fast", "--out", str(out)], capture_output=True, text=True,
                           timeout=1500, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already packed" in again.stdout
    assert "sample: wrote" not in again.stdout          # samples with the same n and settings are reused
    # the second report times the whole run: each stage summed over both invocations (out/timings.json)
    first, second = report["set_sizes"], json.loads((out / "report" / "report.json").read_text())["set_sizes"]
    assert "timings_all_s" not in first
    both = second["timings_all_s"]
    assert both["total"] >= first["timings_s"]["total"] + second["timings_s"]["total"] - 0.2
    for stage, seconds in first["timings_s"].items():
        assert both[stage] >= seconds + second["timings_s"][stage] - 0.2, stage
    assert "This run was resumed" in (out / "report" / "report.md").read_text()


def test_public_sets_pack_under_plain_names_and_unknown_sets_are_refused(tmp_path):
    from dataclasses import replace

    from dpldm.errors import DpldmError
    from dpldm.recipes.quickstart import FAST, PUBLIC_SETS, pack_sets, public_set
    plan = replace(FAST, public_n=20, public="glyphs")
    assert public_set(plan) == PUBLIC_SETS["glyphs"] and FAST.public == "glyphs"
    assert public_set(replace(FAST, public="fashion"))[1] == "pretrain_fashion.yaml"
    data = pack_sets(tmp_path, plan, ("glyphs",))
    assert data["glyphs"] == tmp_path / "data" / "glyphs-digits-train"     # no ':' in the folder name
    assert json.loads((data["glyphs"] / "dataset.json").read_text())["count"] == 20
    with pytest.raises(DpldmError, match="public must be one of"):
        public_set(replace(FAST, public="svhn"))


def test_a_stopped_stage_records_no_time_and_says_so(capsys, tmp_path):
    """A signal's checkpoint-and-exit (SystemExit) inside a stage is not the stage's time: the report's timings
    would otherwise count a partial stage as done (seen when a --plan long run was stopped in its pretraining).
    Its time still counts in the sums over every invocation (timings.json), with the resumed stage's own."""
    from dpldm.recipes.quickstart import Stage, read_times
    timings, times = {}, tmp_path / "timings.json"
    with Stage("done", timings, times):
        pass
    with pytest.raises(SystemExit):
        with Stage("pretrain", timings, times):
            time.sleep(0.3)
            raise SystemExit(3)
    assert list(timings) == ["done"]
    assert "=== pretrain: stopped after 0s (SystemExit); re-run to resume" in capsys.readouterr().out
    assert read_times(times)["pretrain"] >= 0.3 - 0.05
    resumed = {}
    with Stage("pretrain", resumed, times):       # the next invocation finishes the stage
        time.sleep(0.2)
    assert 0.2 - 0.05 <= resumed["pretrain"] < read_times(times)["pretrain"]
    assert read_times(times)["pretrain"] >= 0.5 - 0.1 and set(read_times(times)) == {"done", "pretrain"}
