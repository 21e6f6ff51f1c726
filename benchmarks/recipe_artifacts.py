"""Run every built-in recipe and print the SHA-256 of each artifact it writes: the check that a
change leaves the built-in recipes' results byte for byte the same.

    python benchmarks/recipe_artifacts.py --out /tmp/new                       # this tree
    python benchmarks/recipe_artifacts.py --out /tmp/old --src OLD_CHECKOUT/src  # another checkout
    python benchmarks/recipe_artifacts.py --compare /tmp/old /tmp/new           # the two tables side by side

Each recipe runs as ``modelpress compress -r NAME --set eval.latency=false`` (latency is kept out
of artifacts anyway) in its own process, 1 thread, with a fresh baseline cache in the output
folder, so baselines are trained by the code under test too. About 12 minutes on 2 cores, most of
it MiniLM's distillation in ``minilm-distill-prune-int8``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def builtin_recipes(src: Path) -> list[str]:
    return sorted(p.stem for p in (src / "modelpress" / "recipes" / "builtin").glob("*.yaml"))


def run_all(out: Path, src: Path, only: list[str] | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "MODELPRESS_CACHE": str(out / "cache"), "OMP_NUM_THREADS": "1",
           "MODELPRESS_PROGRESS": "0"}
    table = {}
    for name in only or builtin_recipes(src):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "modelpress.cli", "compress", "-r", name, "-o", str(out / name),
                              "--set", "eval.latency=false"], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if res.returncode != 0:
            table[name] = {"error": (res.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds}
            print(f"{name}: FAILED ({table[name]['error']})", file=sys.stderr)
            continue
        files = {str(p.relative_to(out / name)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted((out / name).rglob("*.safetensors"))}
        table[name] = {"files": files, "seconds": seconds}
        print(f"{name}: {len(files)} artifacts, {seconds:.0f} s", file=sys.stderr)
    (out / "hashes.json").write_text(json.dumps(table, indent=1))
    return table


def print_table(table: dict) -> None:
    print("| recipe | artifact | sha256 (first 16) |\n|---|---|---|")
    for name, entry in table.items():
        for f, h in entry.get("files", {}).items():
            print(f"| {name} | {f} | {h[:16]} |")


def compare(a: Path, b: Path) -> int:
    old, new = (json.loads((p / "hashes.json").read_text()) for p in (a, b))
    print(f"| recipe | artifact | {a.name} | {b.name} | same |\n|---|---|---|---|---|")
    differ = 0
    for name in sorted(set(old) | set(new)):
        files = sorted(set(old.get(name, {}).get("files", {})) | set(new.get(name, {}).get("files", {})))
        for f in files:
            x, y = old.get(name, {}).get("files", {}).get(f), new.get(name, {}).get("files", {}).get(f)
            same = x is not None and x == y
            differ += x is not None and y is not None and not same
            print(f"| {name} | {f} | {(x or '-')[:16]} | {(y or '-')[:16]} | "
                  f"{'yes' if same else 'no' if x and y else 'only one side'} |")
    return 1 if differ else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the runs and hashes.json")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the src/ folder of the modelpress to run")
    parser.add_argument("--recipes", default="", help="comma-separated subset (default: every built-in recipe)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two --out folders")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if args.out is None:
        parser.error("--out is required (or --compare A B)")
    print_table(run_all(args.out, args.src.resolve(), [r for r in args.recipes.split(",") if r] or None))


if __name__ == "__main__":
    main()
