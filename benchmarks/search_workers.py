"""Search workers sharing one study (issue 19): wall time of 1 worker against 2 (or more) on the same trials.

Each worker is the CLI, ``modelpress search`` with the same ``--storage`` and a fresh ``--study`` per
run, started at once; the study should reach ``--trials`` trials in total. The ratio printed is
(wall time with N workers) / (wall time with 1): ~1/N when the trials dominate and the machine has
the cores. Every worker pays its own start-up (imports, the cached baseline), which caps the gain
for short studies. Give it a PostgreSQL URL; a throwaway server on this machine:

    initdb -D /tmp/pg -A trust -U postgres && pg_ctl -D /tmp/pg -o "-k /tmp -p 5499" -w start
    python benchmarks/search_workers.py --storage "postgresql+psycopg://postgres@/postgres?host=/tmp&port=5499"

(as root, run initdb and pg_ctl as the postgres user: ``runuser -u postgres -- ...``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_workers(n: int, storage: str, study: str, trials: int, args: argparse.Namespace, folder: Path) -> float:
    env = {**os.environ, "MODELPRESS_PROGRESS": "0", "MODELPRESS_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "modelpress.cli", "search", "-m", args.model, "-d", args.data,
           "--budget", "bytes=1e12", "--max-drop", "100", "--trials", str(trials), "--storage", storage,
           "--study", study, "--set", f"finetune={{epochs: {args.epochs}, lr: 0.002}}"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "-o", str(folder / f"{study}-{i}")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode not in (0, 3):  # 3: no trial met the budget (none is asked for here)
            raise SystemExit(f"a worker failed (exit {p.returncode}):\n{err[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True, help="database URL shared by the workers (PostgreSQL)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--model", default="lenet300")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--epochs", type=float, default=2.0, help="fine-tune epochs per trial (the CPU-bound part)")
    args = ap.parse_args()
    stamp = int(time.time())
    with tempfile.TemporaryDirectory(prefix="search-workers-") as tmp:
        folder = Path(tmp)
        run_workers(1, args.storage, f"warm-{stamp}", 1, args, folder)  # caches the baseline for every worker
        one = run_workers(1, args.storage, f"one-{stamp}", args.trials, args, folder)
        many = run_workers(args.workers, args.storage, f"many-{stamp}", args.trials, args, folder)
    print(f"| workers | trials | wall time | ratio to 1 worker |\n|--:|--:|--:|--:|\n"
          f"| 1 | {args.trials} | {one:.1f} s | 1.00 |\n"
          f"| {args.workers} | {args.trials} | {many:.1f} s | {many / one:.2f} |")
    print(f"\n{args.model} on {args.data}, {args.epochs:g} fine-tune epochs a trial, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
