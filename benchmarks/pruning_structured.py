"""Structured pruning that removes channels / heads: modelpress vs Torch-Pruning, plus MiniLM heads.

Rows (one table):

* ``resnet_small`` dense: the shared cached baseline (``get_baseline("resnet_small", mnist5k)``);
* modelpress ``prune.channels`` with ``target_macs_reduction=0.5``, layer-wise ranking:
  Taylor importance (4 training batches) and L1 importance with ``round_to=8`` (channel counts
  multiple of 8, which CPU conv kernels run much faster), and L1 without rounding; each
  followed by ``fit`` with TrainConfig(epochs=3, lr=1e-3), seed 0;
* Torch-Pruning ``MetaPruner`` with ``GroupTaylorImportance`` (gradients of the same 4 batches)
  or ``GroupMagnitudeImportance(p=1)``, classifier ignored, ``round_to=8``, its uniform
  ``pruning_ratio`` found by bisection as the smallest one reaching the MAC reduction of the
  matching modelpress row; then the same fine-tune, same seed;
* MiniLM (all-MiniLM-L6-v2, bundled) dense, and ``prune.heads`` removing 25% of the heads and
  40% of the FFN neurons of every layer, **no recovery training**; quality is Spearman on the
  bundled STS pairs and fidelity (mean cosine to the dense model's embeddings).

Accuracy is top-1 on the mnist5k test split (1,000 images): "pruned" right after the cut,
"ft" after the fine-tune. MACs are counted per sample (``modelpress.nn.macs``); "size"
is the modelpress artifact on disk. Latency is eager PyTorch on CPU at batch 64 (CNNs) or
32 (MiniLM, sequence length = longest of the first 32 STS sentences), measured with
``compare_latency`` (dense and pruned alternate in one process, median of many calls), at
1 and 2 threads; "x" is dense median / pruned median.

    python benchmarks/pruning_structured.py            # full run
    python benchmarks/pruning_structured.py --quick    # smoke run: short fine-tunes, few timings
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

from modelpress import TrainConfig, prune  # noqa: E402
from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.core.data import Data  # noqa: E402
from modelpress.core.training import evaluate_accuracy, fit  # noqa: E402
from modelpress.nn.macs import count_macs  # noqa: E402
from modelpress.pruning.heads import HeadPruning  # noqa: E402
from modelpress.pruning.structured import ChannelPruning  # noqa: E402
from modelpress.zoo.baselines import get_baseline  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402

MAC_TARGET = 0.5


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def artifact_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        return save_artifact(model, Path(d) / "m.safetensors").stat().st_size


def macs(model, x) -> int:
    return count_macs(model, x).total


def fine_tune(model, bundle, cfg: TrainConfig, seed: int = 0):
    torch.manual_seed(seed)
    return fit(model, Data(bundle.train, batch_size=cfg.batch_size, shuffle=True, seed=seed), cfg).eval()


def torch_pruning_to(base, x1, target: float, calib, importance: str = "l1", round_to: int | None = None):
    """Torch-Pruning MetaPruner with the smallest uniform ratio reaching ``target`` MAC reduction."""
    import torch.nn.functional as F
    import torch_pruning as tp

    def pruned_at(ratio):
        m = copy.deepcopy(base)
        imp = (tp.importance.GroupTaylorImportance() if importance == "taylor"
               else tp.importance.GroupMagnitudeImportance(p=1))
        pruner = tp.pruner.MetaPruner(m, x1, importance=imp, pruning_ratio=ratio, ignored_layers=[m.fc],
                                      round_to=round_to)
        if importance == "taylor":  # Torch-Pruning reads the gradients left by a backward pass
            m.zero_grad()
            for x, y in calib:
                F.cross_entropy(m(x), y).backward()
        pruner.step()
        return m.eval()

    dense = macs(base, x1)
    lo, hi = 0.0, 0.9
    for _ in range(12):
        mid = (lo + hi) / 2
        if 1 - macs(pruned_at(mid), x1) / dense >= target:
            hi = mid
        else:
            lo = mid
    return pruned_at(hi), hi


def latency(dense, pruned, x, repeats: int, min_time_s: float):
    out = {}
    for threads in (1, 2):
        cmp = compare_latency(dense, pruned, x, threads=threads, warmup=5, repeats=repeats, min_time_s=min_time_s)
        out[threads] = (cmp.a.median_ms, cmp.b.median_ms, cmp.ratio)
    return out


def cnn_rows(args) -> list[dict]:
    bundle = load_dataset("mnist5k")
    base, _ = get_baseline("resnet_small", bundle)
    base.eval()
    x1 = bundle.test[0][0].unsqueeze(0)
    x64 = torch.stack([bundle.test[i][0] for i in range(64)])
    ft = TrainConfig(epochs=3, lr=1e-3, max_steps=20 if args.quick else None)
    acc0 = evaluate_accuracy(base, bundle.test)
    rows = [{"row": "resnet_small dense", "quality": f"acc {acc0:.2%}", "acc": acc0, "params": n_params(base),
             "macs": macs(base, x1), "bytes": artifact_bytes(base), "lat": None}]

    repeats, min_t = (5, 0.0) if args.quick else (60, 3.0)
    calib = [tuple(torch.utils.data.default_collate([bundle.train[i] for i in range(j, j + 64)]))
             for j in range(0, 256, 64)]  # 4 training batches: the example input and Taylor's gradients
    pruned = []  # (row name, model, accuracy right after the cut, note)
    for importance, round_to in (("taylor", 8), ("l1", 8), ("l1", None)):
        t = time.perf_counter()
        cfg = ChannelPruning(target_macs_reduction=MAC_TARGET, importance=importance, round_to=round_to)
        mp = prune(base, cfg, calib).eval()
        prune_s = time.perf_counter() - t
        cut = evaluate_accuracy(mp, bundle.test)
        t = time.perf_counter()
        fine_tune(mp, bundle, ft)
        reached = 1 - macs(mp, x1) / macs(base, x1)
        pruned.append((f"modelpress prune.channels {importance}, round_to={round_to}, -{reached:.1%} MACs, + ft", mp,
                       cut, f"prune {prune_s:.1f}s, ft {time.perf_counter() - t:.0f}s"))
        if round_to:
            # Torch-Pruning at the same MAC reduction, importance and channel rounding; same fine-tune
            t = time.perf_counter()
            tpm, tp_ratio = torch_pruning_to(base, x1, reached, calib, importance, round_to)
            tp_s = time.perf_counter() - t
            tp_cut = evaluate_accuracy(tpm, bundle.test)
            fine_tune(tpm, bundle, ft)
            tp_reached = 1 - macs(tpm, x1) / macs(base, x1)
            pruned.append((f"torch-pruning MetaPruner {importance}, round_to={round_to}, ratio {tp_ratio:.3f}, "
                           f"-{tp_reached:.1%} MACs, + ft", tpm, tp_cut, f"ratio search + prune {tp_s:.1f}s"))
    for name, model, cut, note in pruned:
        acc = evaluate_accuracy(model, bundle.test)
        rows.append({"row": name, "quality": f"acc {cut:.2%} -> ft {acc:.2%} ({(acc - acc0) * 100:+.2f} pt)",
                     "acc": acc, "drop": (acc0 - acc) * 100,
                     "params": n_params(model), "macs": macs(model, x1), "bytes": artifact_bytes(model),
                     "lat": latency(base, model, x64, repeats, min_t), "note": note})
    return rows


def minilm_rows(args) -> list[dict]:
    from modelpress.tasks.embedding import embedding_quality, pair_sentences, tokenize
    from modelpress.zoo.corpora import load_sts_pairs
    from modelpress.zoo.models import build_model

    dense = build_model("minilm").eval()
    pairs = load_sts_pairs()
    tokens = tokenize(dense.tokenizer, pair_sentences(pairs)[:32])
    q0 = embedding_quality(dense, pairs)
    rows = [{"row": "MiniLM-L6 dense", "quality": f"spearman {q0['spearman']:.4f}", "spearman": q0["spearman"],
             "params": n_params(dense),
             "macs": macs(dense, {k: v[:1] for k, v in tokens.items()}), "bytes": artifact_bytes(dense), "lat": None}]
    t = time.perf_counter()
    pruned = prune(dense, HeadPruning(head_ratio=0.25, ffn_ratio=0.4)).eval()
    prune_s = time.perf_counter() - t
    q = embedding_quality(pruned, pairs, reference=dense)
    repeats, min_t = (3, 0.0) if args.quick else (30, 3.0)
    rows.append({"row": "MiniLM prune.heads 25% heads, 40% FFN (no training)",
                 "quality": f"spearman {q['spearman']:.4f}, fidelity {q['fidelity']:.4f}",
                 "spearman": q["spearman"], "fidelity": q["fidelity"],
                 "params": n_params(pruned), "macs": macs(pruned, {k: v[:1] for k, v in tokens.items()}),
                 "bytes": artifact_bytes(pruned), "lat": latency(dense, pruned, tokens, repeats, min_t),
                 "note": f"prune {prune_s:.1f}s, batch 32 x {tokens['input_ids'].shape[1]} tokens"})
    return rows


def fmt_lat(lat, threads):
    if lat is None:
        return "-"
    a, b, r = lat[threads]
    return f"{a:.1f} -> {b:.1f} ms ({r:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 fine-tune steps, few timings")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = cnn_rows(args) + minilm_rows(args)
    header = ["", "quality", "params", "MACs/sample", "size (bytes)", "latency 1 thread (dense -> pruned)",
              "latency 2 threads", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["row"], r["quality"], f"{r['params']:,}", f"{r['macs']:,}", f"{r['bytes']:,}",
                 fmt_lat(r["lat"], 1), fmt_lat(r["lat"], 2), r.get("note", "")]
        print("| " + " | ".join(cells) + " |")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
