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
    from dpldm.recipes.quickstart import discussion
    rows = [{"method": "dpldm DP-LoDA", "epsilon": 9.99, "acc_mean": 0.97},
            {"method": "dpldm DP-LoDA", "epsilon": 0.999, "acc_mean": 0.40},
            {"method": "DP-SGD CNN on private data (opacus)", "epsilon": 10.0, "acc_mean": 0.96},
            {"method": "DP-SGD CNN on private data (opacus)", "epsilon": 1.0, "acc_mean": 0.94}]
    text = discussion(rows)
    assert "ε = 10: the classifier trained on DP-LoDA synthetic data (97.0%) beats" in text
    assert "ε = 1: the classifier trained on DP-LoDA synthetic data (40.0%) does NOT beat" in text
    from dpldm.recipes.quickstart import PLANS
    # the full plan's sizes
    assert "affords 160 DP steps of expected batch 512" in text and "30,000 synthetic images per run" in text
    long = discussion(rows, PLANS["long"])
    assert "affords 160 DP steps of expected batch 2,560" in long and "50,000 synthetic images per run" in long
    # against the papers: "reaches" only when the ε = 10 run is at or above the DP-LoDA paper's 95.0%
    assert "at ε = 10 this run's 97.0% reaches the DP-LoDA paper's 95.0%" in text and "Gap to the papers" not in text
    below = discussion([dict(r, acc_mean=0.927) if r["epsilon"] > 5 else r for r in rows])
    assert "Gap to the papers (DP-LoDA 95.0% at ε = 10; this run 92.7%)" in below and "reaches" not in below
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
    from dpldm.eval.shards import write_shards
    from tiny import load_mnist_pickle
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
                   "--no-fid", "--epochs", "10", "--seeds", "2", "--baselines", "--augment", "affine",
                   "--label-smoothing", "0.1",
                   "--real-train", str(tmp_path / "private")])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    rep = json.loads((runs[0] / "report" / "report.json").read_text())
    accs = {r["run"]: r["acc_mean"] for r in rep["rows"]}
    assert accs[str(runs[0])] > 0.5 > accs[str(runs[1])]     # real digits teach, noise does not
    base = {r["method"]: r for r in rep["rows"] if not r["run"]}
    # --augment: the runs' classifiers train on affine views, the real-data baselines on the images as they are
    assert [r["augment"] for r in rep["rows"] if r["run"]] == ["affine", "affine"]
    assert base["No DP (real data)"]["augment"] == "none"
    assert [r["label_smoothing"] for r in rep["rows"] if r["run"]] == [0.1, 0.1]
    assert base["No DP (real data)"]["label_smoothing"] == 0.0
    assert base["DP-SGD classifier (opacus)"]["label_smoothing"] == 0.1      # the same smoothing as the runs
    assert base["No DP (real data)"]["private"] is False and base["No DP (real data)"]["acc_mean"] > 0.5
    dpsgd = base["DP-SGD classifier (opacus)"]
    assert dpsgd["epsilon"] == pytest.approx(2.0, rel=0.02) and dpsgd["sampling"] == "poisson"
    assert dpsgd["sample_rate"] == pytest.approx(200 / 400) and 0 <= dpsgd["acc_mean"] <= 1   # 400 images: ~chance
    assert set(rep["not_private"]) == {str(runs[1]), "No DP (real data)"} and rep["plot"] == "privacy_utility.png"
    # issue 11 §8: each of the 2 DP-SGD models (one per seed) counts in the total, beside the private run
    cost = rep["total_privacy_cost"]
    assert len(dpsgd["trainings"]) == 2 and cost["count"] == 3
    assert cost["basic"]["epsilon"] == pytest.approx(2.0 + 2 * dpsgd["epsilon"])
    assert all(t["explicit_seed"] is False for t in dpsgd["trainings"])      # secret seeds by default
    assert "NOT PRIVATE" in (runs[0] / "report" / "report.md").read_text()
    assert "report.md" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "nothing"), "--real-test", str(tmp_path / "test")]) == 2


# -- issue 11 §8 (total cost) and issue 12 (a report for a paper's appendix) ---------------------------------

def _mechanism(eps, sigma, q, steps, **extra):
    return {"epsilon": eps, "delta": 1e-5, "accountant": "prv", "noise_multiplier": sigma, "sample_rate": q,
            "steps": steps, "private": True, "sampling": "poisson", "warnings": [], **extra}


def test_total_cost_sums_every_private_training_and_composes_them_with_pld(tmp_path):
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    from dpldm.eval.report import zero_cost_row
    from dpldm.eval.total_cost import total_cost
    eps10 = _run(tmp_path, "eps10", True, 3.2)
    led10 = dict(read_ledger(eps10), noise_multiplier=1.0, sample_rate=0.02, steps=50)
    (eps10 / "privacy.json").write_text(json.dumps(led10))
    only_samples = _run(tmp_path, "samples-only", True, 1.5)       # published through its grid only
    sgd = [_mechanism(2.0, 1.2, 0.05, 40) for _ in range(3)]           # `dpldm evaluate --seeds 3`
    nodp = _run(tmp_path, "nodp", False, 0.0, ["NOT PRIVATE: privacy.enabled=false"])
    rows = [row_from_ledger("dpldm", read_ledger(eps10), {"mean": 0.8, "std": 0.0}, run=str(eps10)),
            row_from_ledger("dpldm again", read_ledger(eps10), {"mean": 0.8, "std": 0.0}, run=str(eps10)),  # same run
            row_from_ledger("DP-SGD", sgd[0], {"mean": 0.9, "std": 0.0}, ledgers=sgd),
            row_from_ledger("No DP", read_ledger(nodp), {"mean": 0.99, "std": 0.0}, run=str(nodp)),
            zero_cost_row("pretrained only", {"mean": 0.3, "std": 0.0})]
    rep = write_report(tmp_path / "r", rows, runs=[eps10, only_samples, nodp], paper_rows=PAPERS)
    cost = rep["total_privacy_cost"]
    assert cost == total_cost(rows, {i["run"]: i["ledger"] for i in rep["runs"]})
    assert cost["count"] == 1 + 3 + 1                                  # eps10 once, 3 DP-SGD models, samples-only
    assert cost["basic"]["epsilon"] == pytest.approx(3.2 + 3 * 2.0 + 1.5)
    assert cost["basic"]["delta"] == pytest.approx(5e-5) and "basic composition" in cost["basic"]["method"]
    assert cost["not_private"] == [f"No DP ({nodp})"] and cost["no_private_data"] == ["pretrained only"]
    acc = PLDAccountant(value_discretization_interval=1e-3)           # the exact composition, independently
    for sigma, q, steps in [(1.0, 0.02, 50)] + [(1.2, 0.05, 40)] * 3 + [(1.1, 0.01, 100)]:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert cost["pld"]["epsilon"] == pytest.approx(acc.get_epsilon(5e-5), rel=1e-6)
    assert cost["pld"]["epsilon"] < cost["basic"]["epsilon"] and cost["pld"]["relation"] == "add_remove"
    md = (tmp_path / "r" / "report.md").read_text()
    total = md[md.index("## Total privacy cost"):]
    assert "Total by basic composition" in total and "Total by PLD composition" in total
    assert f"ε = {cost['basic']['epsilon']:.3g}, δ = 5e-05" in total and "| DP-SGD at ε = 2 | 3 | 2 |" in total
    assert "NOT PRIVATE (ε = ∞): No DP" in total and "use no private data (ε = 0): pretrained only" in total
    assert "3 models trained, each at this ε" in md
    assert json.loads((tmp_path / "r" / "report.json").read_text())["total_privacy_cost"]["count"] == 5


def test_total_cost_names_replace_one_and_flags_explicit_seeds_and_missing_mechanisms():
    from dpldm.eval.total_cost import markdown, total_cost
    rows = [row_from_ledger("a", _mechanism(1.0, 1.0, 0.01, 100, relation="replace_one")),
            row_from_ledger("b", _mechanism(1.0, 1.0, 0.01, 100, seed="explicit"))]
    cost = total_cost(rows)
    assert cost["pld"]["relation"] == "replace_one" and cost["explicit_seed"] == ["b at ε = 1"]
    text = "\n".join(markdown(cost))
    assert "replace-one relation" in text and "different neighbouring relations" in text
    assert "EXPLICIT SEED" in text and "not a release" in text
    bare = total_cost([{"method": "hand-made", "epsilon": 2.0, "delta": 1e-5, "private": True}])
    assert bare["basic"]["epsilon"] == 2.0 and bare["pld"] is None and "σ, q, steps" in bare["pld_note"]
    assert total_cost([{"method": "p", "epsilon": 10.0, "paper": True}])["count"] == 0


def test_report_warts_fixed_legend_not_private_once_timings_table_and_zero_epsilon_run(tmp_path):
    """Issue 12: "DP-LDM (paper) (paper)", "NOT PRIVATE; NOT PRIVATE", a raw timings dict, the ε = 0 run headed
    "(private)" and missing from the log-scale plot."""
    from dpldm.eval.report_figures import plot_privacy_utility
    from dpldm.recipes.quickstart import PAPER_ROWS
    dp = _run(tmp_path, "eps10", True, 9.9)
    base = _run(tmp_path, "pretrained-only", True, 0.0, ["uses no private data: the public pretrained model only"])
    rows = [row_from_ledger("dpldm DP-LoDA", read_ledger(dp), {"mean": 0.8, "std": 0.0}, run=str(dp)),
            row_from_ledger("pretrained only", read_ledger(base), {"mean": 0.5, "std": 0.0}, run=str(base)),
            row_from_ledger("No DP: CNN on real private data", {"private": False, "warnings": [
                "NOT PRIVATE: trained directly on the private data"]}, {"mean": 0.99, "std": 0.0})]
    write_report(tmp_path / "r", rows, runs=[dp, base], paper_rows=PAPER_ROWS,
                 set_sizes={"private": 100, "timings_s": {"pack": 12.3, "pretrain": 300.0, "total": 400.0}})
    md = (tmp_path / "r" / "report.md").read_text()
    nodp_line = next(ln for ln in md.splitlines() if ln.startswith("| No DP"))
    assert nodp_line.count("NOT PRIVATE") == 1
    assert "{'pack'" not in md and "| pack | 12 | 0.2 |" in md and "| **total** | 400 | 6.7 |" in md
    assert "Times of this invocation; its folder records no earlier one" in md
    assert "all invocations" not in md
    assert f"`{base}` (uses no private data, ε = 0)" in md and f"`{base}` (private)" not in md
    assert "| 0 (no private data) |" in md and f"`{dp}` (private)" in md
    labels = plot_privacy_utility(rows + [dict(r, paper=True) for r in PAPER_ROWS], tmp_path / "p.png")
    assert "DP-LDM (paper)" in labels and not any("(paper) (paper)" in x for x in labels)
    assert "pretrained only (ε = 0)" in labels                     # ε = 0 is a reference line on the log plot
    assert "No DP: CNN on real private data (ε = ∞)" in labels     # not "No DP: ... (no DP)"


def test_a_resumed_runs_timings_show_every_invocation_beside_the_last(tmp_path):
    """A run stopped and resumed by re-running: its report times the whole run (the sums the quickstart keeps in
    --out/timings.json), not only the last invocation, which found most stages done."""
    write_report(tmp_path / "r", [], set_sizes={
        "timings_s": {"pack": 0.4, "pretrain": 22.0, "total": 60.0},
        "timings_all_s": {"pack": 110.0, "pretrain": 1162.0, "total": 4484.0}})
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| pretrain | 1162 | 19.4 | 22 |" in md and "| **total** | 4484 | 74.7 | 60 |" in md
    assert "This run was resumed" in md and "records no earlier one" not in md


def test_explicit_seed_rows_are_flagged_loudly(tmp_path):
    from dpldm.privacy.ledger import EXPLICIT_SEED_WARNING
    run = _run(tmp_path, "seeded", True, 2.0, ["EXPLICIT SEED: reproducible by whoever has the seed; not a release"])
    rows = [row_from_ledger("dpldm", read_ledger(run), {"mean": 0.7, "std": 0.0}, run=str(run)),
            row_from_ledger("DP-SGD", _mechanism(2.0, 1.0, 0.1, 10, warnings=[EXPLICIT_SEED_WARNING]),
                            {"mean": 0.8, "std": 0.0})]
    write_report(tmp_path / "r", rows, runs=[run])
    md = (tmp_path / "r" / "report.md").read_text()
    results = md[md.index("## Results"):md.index("## Total privacy cost")]
    lines = [ln for ln in results.splitlines() if ln.startswith(("| dpldm", "| DP-SGD"))]
    assert len(lines) == 2 and all("| 2 **⚠ EXPLICIT SEED: not a release** |" in ln for ln in lines)
    assert md[md.index("## Total privacy cost"):md.index("## Runs")].count("**⚠ EXPLICIT SEED**") == 2
    assert f"> **⚠ EXPLICIT SEED: run `{run}`" in md


def test_sample_grids_have_one_row_per_class_named_from_the_config(tmp_path):
    import numpy as np

    from dpldm.config import Config, apply_mapping, save_config
    from dpldm.eval.report_figures import _row_label, class_labels_of
    run = _run(tmp_path, "eps1", True, 1.0)
    (run / "samples" / "images").mkdir()
    labels = [i % 3 for i in range(12)]
    for i, k in enumerate(labels):
        Image.fromarray(np.full((28, 28), 80 * k, dtype=np.uint8)).save(run / "samples" / "images" / f"{i:06d}.png")
    (run / "samples" / "samples.json").write_text(json.dumps({"n": 12, "labels": labels}))
    save_config(apply_mapping(Config(), {"model.class_names": ["zero", "one", "two"]}), run / "config.yaml")
    (run / "classes.json").write_text(json.dumps({"class_names": ["private-a", "private-b", "private-c"]}))
    write_report(tmp_path / "r", [row_from_ledger("x", read_ledger(run), {"mean": 0.5, "std": 0.0})], runs=[run])
    grid = Image.open(tmp_path / "r" / "grids" / "eps1.png")
    assert grid.size != (64, 64) and grid.size[1] > 3 * 28          # drawn by class, not the plain grid copied
    assert class_labels_of(run) == (["zero", "one", "two"], False)   # never classes.json (private labels)
    assert _row_label(1, ["zero", "one"], False) == "1 · one" and _row_label(5, ["zero"], False) == "class 5"
    assert _row_label(0, ["T-shirt"], True) == "0 (prompt: T-shirt)"
