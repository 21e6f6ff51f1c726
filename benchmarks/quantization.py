"""Issue 4's quantization benchmark: its four tasks side by side in one run, one table.

1. LeNet-5 and the small ResNet on mnist5k, static W8A8 deployed through ONNX Runtime: each
   modelpress calibrator vs ONNX Runtime's own ``quantize_static`` (MinMax, Entropy, Percentile);
   target: accuracy drop <= 0.3 points; latency vs the fp32 ONNX model at batch 64.
   (rows from ``quant_static.py``)
2. Int4 weight-only per-channel PTQ, then QAT W4A8 recovering to <= 0.5 points (plus AdaRound,
   int8 weight-only and mixed precision). (rows from ``quant_training.py``)
3. Deep Compression on LeNet-5: prune + k-means weight sharing + Huffman, >= 39x smaller than the
   fp32 state_dict with drop <= 0.5 points, reloaded from disk. (rows from ``quant_deep_compression.py``)
4. MiniLM dynamic int8: Spearman within 0.01 of fp32, fidelity >= 0.98, size, batch-32 latency
   vs torch.ao ``quantize_dynamic`` and ONNX Runtime ``quantize_dynamic``. (rows from ``quant_dynamic.py``)

Every row starts from the same cached baselines (``get_baseline``, seed 0) or the bundled MiniLM.
Each source script's docstring says exactly how its rows are produced; run one alone for its
longer table. "x smaller" is against the fp32 state_dict bytes (task 1: the fp32 .onnx file); latency ratios are
"reference median / row median" measured alternating in one process (``compare_latency``).

    python benchmarks/quantization.py            # full run (~15 minutes on 2 idle cores)
    python benchmarks/quantization.py --quick    # smoke run
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

import quant_deep_compression  # noqa: E402
import quant_dynamic  # noqa: E402
import quant_static  # noqa: E402
import quant_training  # noqa: E402

HEADER = ["task", "model", "method", "quality", "drop", "size (bytes)", "x smaller", "latency x", "target met",
          "notes"]


def _yes(flag) -> str:
    return "" if flag is None else ("yes" if flag else "no")


def static_rows(quick: bool) -> list[list[str]]:
    out, fp32_bytes = [], {}
    for r in quant_static.rows(quick):
        fp32_bytes.setdefault(r["model"], r["bytes"])  # each model's first row is its fp32 ONNX file
        lat = r.get("lat")
        lat_s = "-" if not lat else f"1 thr {lat[1][2]:.2f}; 2 thr {lat[2][2]:.2f}"
        target = None if r["row"].startswith("fp32") else r["drop"] <= 0.3
        out.append(["1", r["model"], r["row"], f"acc {r['acc']:.2%} (ORT)", f"{r['drop']:+.2f}", f"{r['bytes']:,}",
                    f"{fp32_bytes[r['model']] / r['bytes']:.2f}", lat_s, _yes(target), r.get("note", "")])
    return out


def training_rows(quick: bool) -> list[list[str]]:
    out = []
    for r in quant_training.rows(quick):
        target = None
        if r["method"].startswith("QAT W4A8"):
            target = r["drop"] <= 0.5
        out.append(["2", r["model"], r["method"], f"acc {r['accuracy']:.2%}", f"{r['drop']:+.2f}",
                    f"{r['artifact_bytes']:,}", f"{r['x_smaller']:.2f}", "-", _yes(target), r.get("note", "")])
    return out


def deep_compression_rows(quick: bool) -> list[list[str]]:
    out = []
    for r in quant_deep_compression.rows(quick):
        target = None
        if r["row"].startswith("pruned + k-means + Huffman") or r["row"].startswith("final, reloaded"):
            target = r["x_smaller"] >= 39 and r["drop"] <= 0.5
        out.append(["3", "lenet5", r["row"], f"acc {r['accuracy']:.2%}", f"{r['drop']:+.2f}", f"{r['bytes']:,}",
                    f"{r['x_smaller']:.1f}", "-", _yes(target), r.get("note", "")])
    return out


def dynamic_rows(quick: bool) -> list[list[str]]:
    out = []
    rows = quant_dynamic.rows(quick)
    fp32_bytes = sum(t.numel() * t.element_size() for t in _minilm_state().values())
    for r in rows:
        lat = r.get("lat")
        lat_s = "-" if not lat else "; ".join(
            f"{b} {t} thr {lat[(b, t)][2]:.2f}" for b in ("short", "long") for t in (1, 2) if (b, t) in lat)
        out.append(["4", "minilm", r["row"], f"spearman {r['spearman']:.4f}, fidelity {r['fidelity']:.4f}", "-",
                    f"{r['bytes']:,} ({r['size_kind']})", f"{fp32_bytes / r['bytes']:.2f}", lat_s,
                    _yes(r.get("target")), r.get("note", "")])
    return out


def _minilm_state():
    from modelpress.zoo.models import build_model

    return build_model("minilm").state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short training, few timings")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = static_rows(args.quick) + training_rows(args.quick) + deep_compression_rows(args.quick) \
        + dynamic_rows(args.quick)
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores. Latency x: task 1 = fp32 ONNX / int8 ONNX at batch 64; task 4 = fp32 eager "
          "PyTorch / row at batch 32 (short = longest sentence, long = 128 tokens). Targets: task 1 drop <= 0.3 pt; "
          "task 2 QAT W4A8 drop <= 0.5 pt; task 3 >= 39x and drop <= 0.5 pt; task 4 spearman within 0.01, "
          "fidelity >= 0.98.")


if __name__ == "__main__":
    main()
