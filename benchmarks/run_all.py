"""`make bench`: run every benchmark in one go; each prints its figures and writes its section of
docs/benchmarks.md (date and machine stamped)."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["dp_overhead.py", "scaling.py", "sampling.py", "threads_vs_processes.py", "optimizer_step.py",
              "dp_microbatch.py"]

if __name__ == "__main__":
    failed = []
    for name in BENCHMARKS:
        print(f"\n##### {name}", flush=True)
        if subprocess.call([sys.executable, str(HERE / name)]) != 0:
            failed.append(name)
    print("\nall benchmarks done" if not failed else f"\nfailed: {failed}")
    sys.exit(1 if failed else 0)
