"""Reports: report.json/report.md with grids, ledger fields, loud NOT PRIVATE marking, the plot."""
import json
import math

import pytest
from PIL import Image

from dpldm.errors import DpldmError
from dpldm.eval.report import PRIVACY_SCOPE, read_ledger, row_from_ledger, write_report

PAPERS = [{"method": m, "epsilon": 10.0, "delta": 1e-5, "acc_mean": a / 100}
          for m, a in [("DP-LDM", 94.3), ("DP-LoDA", 95.0), ("DP-Diffusion", 95.9), ("DPDM", 98.1), ("DP-SGD", 79.3)]]


def _run(root, name, private, eps, warnings=()):
    run = root / name
    (run / "samples").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10) if private else (10, 10, 200)).save(run / "samples" / "grid.png")
    ledger = {"epsilon": eps, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 1.1 if private else 0.0,
              "sample_rate": 0.01, "steps": 100, "private": private, "sampling": "poisson",
              "warnings": list(warnings)}
    (run / "privacy.json").write_text(json.dumps(ledger))
    return run


def test_report_with_grids_plot_and_not_private_marker(tmp_path):
    dp1 = _run(tmp_path, "eps1", True, 1.0)
    dp10 = _run(tmp_path, "eps10", True, 10.0, ["expected batch below 64"])
    nodp = _run(tmp_path, "nodp", False, 0.0, ["NOT PRIVATE: privacy.enabled=false"])
    rows = [row_from_ledger("dpldm loda", read_ledger(dp1), {"mean": 0.80, "std": 0.01, "runs": [0.79, 0.81]},
                            {"fid": 40.0, "n_fake": 200}, run=str(dp1)),
            row_from_ledger("dpldm loda", read_ledger(dp10), {"mean": 0.90, "std": 0.02, "runs": [0.88, 0.92]},
                            run=str(dp10)),
            row_from_ledger("dpldm loda", read_ledger(nodp), {"mean": 0.97, "std": 0.0, "runs": [0.97]}, run=str(nodp))]
    assert rows[2]["private"] is False and math.isinf(rows[2]["epsilon"])
    rep = write_report(tmp_path / "report", rows, runs=[dp1, dp10, nodp], paper_rows=PAPERS,
                       selection_note="guidance chosen on public data", set_sizes={"real test": 1000})
    out = tmp_path / "report"
    data = json.loads((out / "report.json").read_text())
    assert data["selection_on_private_data"] == "guidance chosen on public data"
    assert data["privacy_scope"] == PRIVACY_SCOPE and "pretrain" in PRIVACY_SCOPE
    assert data["not_private"] == [str(nodp)]
    assert [r["private"] for r in data["runs"]] == [True, True, False]
    assert data["rows"][2]["epsilon"] == "inf" and "Infinity" not in (out / "report.json").read_text()
    for run in ("eps1", "eps10", "nodp"):
        assert Image.open(out / "grids" / f"{run}.png").size == (64, 64)
    plot = Image.open(out / data["plot"])
    assert plot.format == "PNG" and plot.size[0] > 300
    md = (out / "report.md").read_text()
    assert "NOT PRIVATE" in md and str(nodp) in md.split("NOT PRIVATE")[1][:200]
    assert "expected batch below 64" in md and "(grids/eps1.png)" in md and "privacy_utility.png" in md
    assert "80.0 ± 1.0" in md and "40.0 (200)" in md and "DPDM" in md and "98.1" in md
    assert "Selection on private data" in md and "1000" in md
    assert rep["rows"][0]["accountant"] == "prv"


def test_single_row_report_has_no_plot_and_default_selection_note(tmp_path):
    run = _run(tmp_path, "only", True, 3.0)
    rep = write_report(tmp_path / "r", [row_from_ledger("x", read_ledger(run), {"mean": 0.5, "std": 0.0})], runs=[run])
    assert rep["plot"] is None and not (tmp_path / "r" / "privacy_utility.png").exists()
    assert "invariant 6" in rep["selection_on_private_data"]
    assert "NOT PRIVATE" not in (tmp_path / "r" / "report.md").read_text()


def test_quickstart_discussion_compares_against_dp_sgd_at_each_epsilon(tmp_path):
    from dpldm.quickstart import discussion
    rows = [{"method": "dpldm DP-LoDA", "epsilon": 9.99, "acc_mean": 0.97},
            {"method": "dpldm DP-LoDA", "epsilon": 0.999, "acc_mean": 0.40},
            {"method": "DP-SGD CNN on private data (opacus)", "epsilon": 10.0, "acc_mean": 0.96},
            {"method": "DP-SGD CNN on private data (opacus)", "epsilon": 1.0, "acc_mean": 0.94}]
    text = discussion(rows)
    assert "ε = 10: the classifier trained on DP-LoDA synthetic data (97.0%) beats" in text
    assert "ε = 1: the classifier trained on DP-LoDA synthetic data (40.0%) does NOT beat" in text
    write_report(tmp_path / "r", [dict(r, private=True) for r in rows], discussion=text)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.index("## Reading the results") < md.index("## What ε covers") and "does NOT beat" in md


def test_missing_or_broken_ledger_is_a_clear_error(tmp_path):
    with pytest.raises(DpldmError, match="privacy.json not found"):
        read_ledger(tmp_path)
    (tmp_path / "privacy.json").write_text("{oops")
    with pytest.raises(DpldmError, match="not valid JSON"):
        read_ledger(tmp_path)
    with pytest.raises(DpldmError, match="method"):
        write_report(tmp_path / "r", [{"epsilon": 1.0}])


def test_dpldm_evaluate_cli_writes_the_report(tmp_path, capsys):
    """`dpldm evaluate` end to end (no FID, tiny classifier budget): real MNIST digits stand in for a
    run's synthetic shards; a private and a NOT PRIVATE run."""
    import torch

    from dpldm.cli import main
    from dpldm.eval.shards import load_mnist_pickle, write_shards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = load_mnist_pickle("train")
        xt, yt = load_mnist_pickle("test")
        runs = [_run(tmp_path, "dp", True, 2.0), _run(tmp_path, "plain", False, 0.0)]
        write_shards(x[:500], y[:500], runs[0] / "samples" / "shards")
        write_shards(torch.rand(300, 1, 28, 28), y[:300], runs[1] / "samples" / "shards")   # noise "samples"
        write_shards(xt[:300], yt[:300], tmp_path / "test")
        write_shards(x[1000:1400], y[1000:1400], tmp_path / "private")
        rc = main(["evaluate", str(runs[0]), str(runs[1]), "--real-test", str(tmp_path / "test"),
                   "--no-fid", "--epochs", "10", "--seeds", "1", "--baselines", "--real-train", str(tmp_path / "private")])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    rep = json.loads((runs[0] / "report" / "report.json").read_text())
    accs = {r["run"]: r["acc_mean"] for r in rep["rows"]}
    assert accs[str(runs[0])] > 0.5 > accs[str(runs[1])]     # real digits teach, noise does not
    base = {r["method"]: r for r in rep["rows"] if not r["run"]}
    assert base["No DP (real data)"]["private"] is False and base["No DP (real data)"]["acc_mean"] > 0.5
    dpsgd = base["DP-SGD classifier (opacus)"]
    assert dpsgd["epsilon"] == pytest.approx(2.0, rel=0.02) and dpsgd["sampling"] == "poisson"
    assert dpsgd["sample_rate"] == pytest.approx(200 / 400) and 0 <= dpsgd["acc_mean"] <= 1   # 400 images: ~chance
    assert set(rep["not_private"]) == {str(runs[1]), "No DP (real data)"} and rep["plot"] == "privacy_utility.png"
    assert "NOT PRIVATE" in (runs[0] / "report" / "report.md").read_text()
    assert "report.md" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "nothing"), "--real-test", str(tmp_path / "test")]) == 2
