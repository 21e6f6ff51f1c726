"""Issue 3's pruning benchmark: the three tasks side by side in one run, one table.

1. LeNet-5 on mnist5k: modelpress global magnitude pruning to 90% with an AGP schedule during a
   6-epoch fine-tune, vs ``torch.nn.utils.prune.global_unstructured`` (L1) at 90% with the same
   fine-tune (same optimizer, schedule, batches and seed). Targets: drop <= 0.5 points, artifact
   >= 6x smaller than the dense fp32 state_dict.
2. Small ResNet on mnist5k: modelpress ``prune.channels`` removing >= 50% of MACs (physically), vs
   Torch-Pruning's MetaPruner at the same MAC reduction, same 3-epoch fine-tune. Targets: drop
   <= 1.0 point, batch-64 CPU latency >= 1.6x faster than dense, measured in the same process.
3. MiniLM (all-MiniLM-L6-v2, bundled): ``prune.heads`` removes 25% of the attention heads and 40%
   of the FFN neurons, no recovery training; size, batch-32 latency, Spearman and fidelity.

All CNN rows start from the same cached baselines (``get_baseline``), seed 0. The rows come
from ``pruning_unstructured.py`` and ``pruning_structured.py`` (which print longer tables with
every criterion); their docstrings say exactly how each row is produced.

Columns: "quality" is top-1 test accuracy (1,000 mnist5k test images) or Spearman/fidelity on
the bundled graded STS pairs; "size" is the modelpress artifact on disk and "x smaller" compares
it with the dense model's fp32 state_dict bytes; latency is eager PyTorch, dense and pruned
alternating in one process (``compare_latency``), median ratio dense/pruned, at 1 and 2 threads
(batch 64 for CNNs, 32 for MiniLM; LeNet-5's unstructured rows run dense kernels, so ~1.0x).

    python benchmarks/pruning.py            # ~3 minutes on 2 idle cores
    python benchmarks/pruning.py --quick    # smoke run: short fine-tunes, few timings
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

import pruning_structured as structured  # noqa: E402
import pruning_unstructured as unstructured  # noqa: E402

from modelpress import MagnitudePruning, Polynomial, TrainConfig, prune  # noqa: E402
from modelpress.core.training import evaluate_accuracy  # noqa: E402
from modelpress.nn.macs import count_macs  # noqa: E402
from modelpress.zoo.baselines import get_baseline  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402


def lenet_rows(args) -> list[dict]:
    bundle = load_dataset("mnist5k")
    base, _ = get_baseline("lenet5", bundle)
    base.eval()
    acc0 = evaluate_accuracy(base, bundle.test)
    dense_bytes = unstructured.state_bytes(base)
    x64 = torch.stack([bundle.test[i][0] for i in range(64)])
    repeats, min_t = (5, 0.0) if args.quick else (60, 2.0)
    train = TrainConfig(epochs=1 if args.quick else 6, lr=1e-3)
    x1 = x64[:1]
    rows = [{"task": 1, "row": "LeNet-5 dense", "quality": f"acc {acc0:.2%}",
             "bytes": unstructured.artifact_bytes(base), "dense_bytes": dense_bytes, "macs": structured.macs(base, x1)}]

    torch.manual_seed(0)
    t = time.perf_counter()
    agp = Polynomial(end_fraction=0.6, frequency=25)
    mp = prune(base, MagnitudePruning(sparsity=unstructured.SPARSITY, schedule=agp), bundle.train, train=train).eval()
    mp_s = time.perf_counter() - t
    t = time.perf_counter()
    tm, t_bytes = unstructured.torch_global_unstructured(base, bundle.train, train, seed=0)
    t_s = time.perf_counter() - t
    for name, model, size, secs, note in (
        ("modelpress prune.magnitude global 90%, AGP + ft", mp, unstructured.artifact_bytes(mp), mp_s,
         "sparse artifact (auto bitmask/relidx per tensor)"),
        ("torch global_unstructured L1 90% + same ft", tm, t_bytes, t_s,
         f"torch.save (dense); as modelpress artifact {unstructured.artifact_bytes(tm):,} B"),
    ):
        acc = evaluate_accuracy(model, bundle.test)
        rows.append({"task": 1, "row": name, "quality": f"acc {acc:.2%}", "drop": (acc0 - acc) * 100, "bytes": size,
                     "dense_bytes": dense_bytes, "macs": structured.macs(model, x1),
                     "sparse_macs": count_macs(model, x1).effective_total,
                     "lat": structured.latency(base, model, x64, repeats, min_t),
                     "note": f"sparsity {unstructured.sparsity_of(model):.1%} of conv2+fc1+fc2; {secs:.0f}s; {note}",
                     "ok": (acc0 - acc) * 100 <= 0.5 and dense_bytes / size >= 6})
    return rows


def check(row, dense) -> str:
    if "ok" in row:
        return "yes" if row["ok"] else "no"
    if row["task"] == 2 and "drop" in row:
        fast = row["lat"][1][2] >= 1.6 and row["lat"][2][2] >= 1.6
        enough = 1 - row["macs"] / dense["macs"] >= 0.5
        return "yes" if (row["drop"] <= 1.0 and fast and enough) else "no"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short fine-tunes, few timings")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = lenet_rows(args)
    cnn = structured.cnn_rows(args)
    minilm = structured.minilm_rows(args)
    for group, task in ((cnn, 2), (minilm, 3)):
        dense = group[0]
        dense_bytes = sum(t.numel() * t.element_size() for t in structured_dense_state(task).values())
        for r in group:
            r.update(task=task, dense_bytes=dense_bytes, ok_text=check(dict(r, task=task), dense))
            r["row"] = r["row"].replace(", + ft", " + ft")
        rows += group

    header = ["task", "model / method", "quality", "MACs/sample", "size (bytes)", "x smaller",
              "latency x (1 thr)", "latency x (2 thr)", "target met", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        lat = r.get("lat")
        macs = f"{r['macs']:,}" + (f" ({r['sparse_macs']:,} non-zero)" if "sparse_macs" in r else "")
        cells = [str(r["task"]), r["row"], r["quality"], macs,
                 f"{r['bytes']:,}", f"{r['dense_bytes'] / r['bytes']:.2f}",
                 f"{lat[1][2]:.2f}" if lat else "-", f"{lat[2][2]:.2f}" if lat else "-",
                 (r["ok_text"] if "ok_text" in r else check(r, None)) if lat else "", r.get("note", "")]
        print("| " + " | ".join(cells) + " |")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores. Targets: task 1 drop <= 0.5 pt and >= 6x smaller; task 2 >= 50% fewer "
          "MACs, drop <= 1.0 pt, >= 1.6x faster at batch 64 (both thread counts); task 3 reported only.")


_DENSE: dict[int, dict] = {}


def structured_dense_state(task: int) -> dict:
    """The fp32 state_dict of task 2's / task 3's dense model (for "x smaller")."""
    if task not in _DENSE:
        if task == 2:
            model, _ = get_baseline("resnet_small", load_dataset("mnist5k"))
        else:
            from modelpress.zoo.models import build_model
            model = build_model("minilm")
        _DENSE[task] = model.state_dict()
    return _DENSE[task]


if __name__ == "__main__":
    main()
