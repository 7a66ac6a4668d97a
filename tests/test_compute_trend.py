"""scripts/compute_trend.py: a resumed run's end-to-end minutes come from its report's sums over every
invocation (the quickstart's timings.json), not from its last invocation."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compute_trend.py"


def _report(run: Path, timings: dict, all_times: dict | None = None) -> None:
    rows = [{"method": "dpldm DP-LoDA", "epsilon": eps, "acc_mean": acc, "acc_std": 0.002, "steps": 160}
            for eps, acc in ((9.99, 0.927), (1.0, 0.92))]
    rows += [{"method": "pretrained only (no fine-tuning)", "epsilon": 0.0, "acc_mean": 0.843},
             {"method": "CNN on the public data (glyphs:digits)", "epsilon": 0.0, "acc_mean": 0.917},
             {"method": "DP-SGD CNN on private data (opacus)", "epsilon": 9.99, "acc_mean": 0.97},
             {"method": "DP-SGD CNN on private data (opacus)", "epsilon": 1.0, "acc_mean": 0.943}]
    sizes = {"synthetic_per_run": 30000, "timings_s": timings, **({"timings_all_s": all_times} if all_times else {})}
    (run / "report").mkdir(parents=True)
    (run / "report" / "report.json").write_text(json.dumps({"rows": rows, "set_sizes": sizes}))


def test_minutes_of_a_resumed_run_are_its_whole_time(tmp_path):
    _report(tmp_path / "full", {"total": 2032.0})
    _report(tmp_path / "long", {"total": 60.0}, {"total": 4484.0})   # resumed: the last invocation took a minute
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "full"), str(tmp_path / "long"),
                           "--out", str(tmp_path / "trend.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"| {tmp_path}")]
    assert [ln.split(" | ")[1] for ln in lines] == ["33.9", "74.7"]
    assert (tmp_path / "trend.png").stat().st_size > 0
    # --minutes still overrides, for reports written before the sums were kept
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "full"), "--minutes", "18.6",
                           "--out", str(tmp_path / "t2.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"| {tmp_path / 'full'} | 18.6 |" in proc.stdout
