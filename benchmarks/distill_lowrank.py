"""Issue 5's benchmark: distillation and low-rank factorization, its tasks in one run, one table.

1. Hinton-style KD on mnist5k: a quarter-width LeNet-300-100 student trained on hard labels vs
   distilled from the LeNet-5 / resnet_small teachers (and both), 3 seeds each, mean +- std;
   target: distillation beats hard labels. (rows from ``distill.py``)
2. MiniLM: a 3-layer student built from the 6-layer all-MiniLM-L6-v2, distilled on unlabeled
   sentences; fidelity and Spearman vs the teacher on the graded pairs, batch-32 latency;
   target: >= 1.8x faster, fidelity >= 0.95. (rows from ``distill_minilm.py``)
3. Low-rank: SVD on LeNet-5's FC layers keeping <= 50% of their parameters (drop <= 0.5 pt);
   Tucker-2 on resnet_small (>= 1.5x fewer MACs, drop <= 1 pt); CP and VBMF-ranked Tucker for
   comparison; measured latency. (rows from ``lowrank.py``)
4. The other schemes: self-distillation vs label training, quantization-aware distillation vs
   QAT. (rows from ``distill_schemes.py``)

Each source script's docstring says exactly how its rows are produced; run one alone for its
own table. Latency ratios are "reference median / row median", measured alternating in one
process (``compare_latency``), so machine load moves both sides alike.

    python benchmarks/distill_lowrank.py            # full run (~15 minutes on 2 cores once the MiniLM
                                                    # student is cached; training it takes ~40 minutes)
    python benchmarks/distill_lowrank.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill  # noqa: E402
import distill_minilm  # noqa: E402
import distill_schemes  # noqa: E402
import lowrank  # noqa: E402

HEADER = ["task", "model", "method", "quality", "vs reference", "params", "MACs / size", "latency x", "target met",
          "notes"]


def _yes(flag) -> str:
    return "" if flag is None else ("yes" if flag else "no")


def kd_rows(quick: bool) -> list[list[str]]:
    rs = distill.rows(quick)
    hard = next(r for r in rs if r["row"].startswith("hard"))
    n_params = sum(p.numel() for p in distill.lenet300_quarter().parameters())
    out = []
    for r in rs:
        teacher = r.get("teacher")
        diff = (r["mean"] - hard["mean"]) * 100
        margin = diff > hard["std"] * 100 + r["std"] * 100  # beats hard labels by more than the two stds
        acc = f"acc {r['mean']:.2%}" + ("" if teacher else f" +- {r['std'] * 100:.2f} (n={len(r['accs'])})")
        out.append(["1", r["row"].split()[1] if teacher else "LeNet-300-100 x1/4", r["row"], acc,
                    "" if teacher or r is hard else f"{diff:+.2f} pt", "" if teacher else f"{n_params:,}", "", "",
                    "" if teacher or r is hard else _yes(margin),
                    "teacher" if teacher else ", ".join(f"{a:.2%}" for a in r["accs"])])
    return out


def minilm_rows(quick: bool) -> list[list[str]]:
    out = []
    for r in distill_minilm.rows(quick):
        lat = r.get("lat")
        lat_s = "-" if not lat else "; ".join(f"{t} thr {lat[t][2]:.2f}" for t in sorted(lat))
        out.append(["2", "minilm", r["row"], f"spearman {r['spearman']:.4f}, fidelity {r['fidelity']:.4f}", "",
                    f"{r['params']:,}", f"{r['bytes']:,} B", lat_s, _yes(r.get("target")), ""])
    return out


def lowrank_rows(quick: bool) -> list[list[str]]:
    out = []
    for r in lowrank.rows(quick):
        model, _, method = r["row"].partition(" ")
        target = None
        if "svd" in method:
            target = r["kept"][0] <= 0.5 and r["drop"] <= 0.5
        elif "tucker rank_ratio" in method:
            target = r["mac_x"] >= 1.5 and r["drop"] <= 1.0
        lat = "-" if r["lat"] is None else f"{r['lat'][2]:.2f}"
        kept = "" if "kept" not in r else f" ({r['kept'][0]:.1%} of {r['kept'][1]})"
        out.append(["3", model, method, f"acc {r['acc']:.2%}", "" if r["drop"] is None else f"{-r['drop']:+.2f} pt",
                    f"{r['params']:,}{kept}",
                    f"{r['macs']:,} MACs" + (f" ({r['mac_x']:.2f}x fewer)" if "mac_x" in r else ""), lat, _yes(target),
                    r.get("note", "")])
    return out


def scheme_rows(quick: bool) -> list[list[str]]:
    out = []
    for r in distill_schemes.rows(quick):
        acc = f"acc {r['acc']:.2%}" + (f" +- {r['std'] * 100:.2f} (n={len(r['per_seed'])})"
                                       if r["std"] is not None and len(r["per_seed"]) > 1 else "")
        out.append(["4", "lenet5", r["row"], acc, "" if r["ref"] is None else f"{(r['acc'] - r['ref']) * 100:+.2f} pt",
                    "", "", "", "", ", ".join(f"{a:.2%}" for a in r["per_seed"]) if len(r["per_seed"]) > 1 else ""])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short training, few timings")
    parser.add_argument("--tasks", default="1,2,3,4", help="comma-separated subset of the tasks to run")
    args = parser.parse_args()
    t0 = time.perf_counter()
    tasks = {t.strip() for t in args.tasks.split(",")}
    makers = {"1": kd_rows, "2": minilm_rows, "3": lowrank_rows, "4": scheme_rows}
    rows = [row for t, make in makers.items() if t in tasks for row in make(args.quick)]
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores. Targets: task 1 KD beats hard labels by more than the two stds; task 2 "
          ">= 1.8x faster at batch 32 (1 thread) and fidelity >= 0.95; task 3 SVD keeps <= 50% of the FC "
          "parameters with drop <= 0.5 pt, Tucker-2 >= 1.5x fewer MACs with drop <= 1 pt. Task 3 latency x: "
          "dense / factorized eager PyTorch at batch 64, 1 thread.")


if __name__ == "__main__":
    main()
