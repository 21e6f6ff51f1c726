"""Deep Compression of LeNet-5 on mnist5k: prune -> k-means weight sharing -> Huffman storage.

The pipeline of Han et al. (ICLR 2016), all in modelpress, from the cached dense baseline
(``get_baseline("lenet5", mnist5k)``):

1. ``prune.magnitude``: global magnitude ranking over all five layers (``keep_first_last=False``),
   AGP (polynomial) schedule during the fine-tune; the global threshold gives the paper's
   shape by itself (convs and the classifier keep more, fc1 and fc2 the least);
2. ``quant.kmeans``: k-means weight sharing, conv layers and fc layers at their own index widths,
   pruned zeros kept, linear centroid init, then the centroids are fine-tuned
   (``train=TrainConfig``: each centroid moves by the summed gradient of its weights);
3. storage: each layer's uint8 indices as relative gaps of the non-zeros + their codes,
   Huffman-coded when smaller (``huffman`` encoding); codebooks and biases in float16.

Rows: the dense baseline; pruned only (sparse fp32 artifact); pruned + k-means with the
indices plain bit-packed (``codes`` encoding: Deep Compression without its Huffman stage);
the final artifact (Huffman); the final artifact reloaded from disk by ``load_artifact``
(accuracy must be identical); and power-of-two levels (``quant.log2``) on the same pruned
model, fine-tuned like the k-means row (levels fixed, so only biases move), for comparison.

"bytes" is the artifact file (safetensors + its compressed JSON header; the final row gives the
header's share); "x smaller" divides the fp32 state_dict's tensor bytes (61,706 parameters x 4 =
246,824 B) by it. Targets (issue 4): >= 39x smaller, drop <= 0.5 points, reload identical.
"seconds" is cumulative wall time of the pipeline up to that row (the reload row: the load alone)
and moves with machine load.

    python benchmarks/quant_deep_compression.py            # full run (~2-4 min on 2 CPU cores)
    python benchmarks/quant_deep_compression.py --quick    # 1 fine-tune epoch per stage
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

from modelpress import MagnitudePruning, Polynomial, TrainConfig, prune, quantize  # noqa: E402
from modelpress.artifact.checkpoint import read_header, read_stored, save_artifact  # noqa: E402
from modelpress.artifact.huffman import describe  # noqa: E402
from modelpress.artifact.loading import load_artifact  # noqa: E402
from modelpress.core.masks import strip_masks  # noqa: E402
from modelpress.core.training import evaluate_accuracy, fit  # noqa: E402
from modelpress.quantization.codebook import PowerOfTwo, WeightSharing, codebook_layers  # noqa: E402
from modelpress.zoo.baselines import get_baseline  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402

LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")
SPARSITY = 0.94           # global, over all five layers
PRUNE_TRAIN = TrainConfig(epochs=8, lr=2e-3)
CONV_BITS, FC_BITS = 4, 3
SHARE_TRAIN = TrainConfig(epochs=4, lr=2e-3)
LOG2_BITS = 5
SEED = 0
TARGET_RATIO, TARGET_DROP = 39.0, 0.5


def state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def save(model, directory: Path, name: str, encodings: dict | None = None) -> Path:
    """Write ``model``'s artifact; ``encodings`` overrides the per-tensor encoding names."""
    model = copy.deepcopy(model)
    if encodings is not None:
        model.modelpress_encodings = encodings
    return save_artifact(model, directory / f"{name}.safetensors")


def sparsity_note(model) -> str:
    per = {n: float((getattr(model, n).weight == 0).float().mean()) for n in LAYERS}
    nnz = sum(int((getattr(model, n).weight != 0).sum()) for n in LAYERS)
    return ", ".join(f"{n} {s:.0%}" for n, s in per.items()) + f"; {nnz:,} non-zero weights"


def rows(quick: bool = False) -> list[dict]:
    torch.manual_seed(SEED)
    bundle = load_dataset("mnist5k")
    base, base_path = get_baseline("lenet5", bundle)
    base.eval()
    dense_acc = evaluate_accuracy(base, bundle.test)
    fp32 = state_bytes(base)
    epochs = (lambda cfg: cfg.model_copy(update={"epochs": 1})) if quick else (lambda cfg: cfg)
    out: list[dict] = []
    tmp = tempfile.TemporaryDirectory()
    d = Path(tmp.name)

    def add(name, model, path, seconds, note="", acc=None):
        acc = evaluate_accuracy(model, bundle.test) if acc is None else acc
        size = path.stat().st_size
        out.append({"row": name, "accuracy": acc, "drop": 100 * (dense_acc - acc), "bytes": size,
                    "x_smaller": fp32 / size, "seconds": seconds, "note": note})

    # Warm-up: torch imports part of itself on the first optimizer step; don't bill it to a row.
    fit(copy.deepcopy(base), bundle.train, TrainConfig(max_steps=2))

    add("dense baseline", base, save(base, d, "dense"), 0.0, f"cached: {base_path.name}; fp32 state_dict {fp32:,} B")

    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    pcfg = MagnitudePruning(sparsity=SPARSITY, keep_first_last=False,
                            schedule=Polynomial(end_fraction=0.6, frequency=25))
    pruned = strip_masks(prune(base, pcfg, bundle.train, train=epochs(PRUNE_TRAIN))).eval()
    t_prune = time.perf_counter() - t0
    add("pruned (magnitude, global, AGP)", pruned, save(pruned, d, "pruned"), t_prune,
        f"{SPARSITY:.1%} global; {sparsity_note(pruned)}; sparse fp32 (bitmask / relative index)")

    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    share = WeightSharing(bits=FC_BITS, layer_bits={"type:Conv2d": CONV_BITS})
    shared = quantize(pruned, share, bundle.train, train=epochs(SHARE_TRAIN)).eval()
    t_share = time.perf_counter() - t0
    levels = ", ".join(f"{n} {m.levels}" for n, m in codebook_layers(shared))
    plain = {f"{n}.indices": "codes" for n, _ in codebook_layers(shared)}
    add("pruned + k-means (no Huffman)", shared, save(shared, d, "kmeans_plain", plain), t_prune + t_share,
        f"conv {CONV_BITS} bits, fc {FC_BITS} bits; centroid fine-tune {epochs(SHARE_TRAIN).epochs:g} epochs; "
        f"levels {levels}; indices bit-packed")

    t0 = time.perf_counter()
    final_path = save(shared, d, "final")
    t_save = time.perf_counter() - t0
    header = read_header(final_path)
    stored, _ = read_stored(final_path)
    layouts = [describe(stored[f"{n}.indices::data"]) for n in LAYERS if f"{n}.indices" in header["encodings"]]
    huff = sum(s.startswith("huffman") for lay in layouts for s in lay["streams"])
    final_acc = evaluate_accuracy(shared, bundle.test)
    add("pruned + k-means + Huffman (final)", shared, final_path, t_prune + t_share + t_save,
        f"{huff} of {sum(len(lay['streams']) for lay in layouts)} index streams Huffman-coded; "
        f"header {header_bytes(final_path):,} B of the file", acc=final_acc)

    t0 = time.perf_counter()
    reloaded, _ = load_artifact(final_path)
    t_load = time.perf_counter() - t0
    re_acc = evaluate_accuracy(reloaded, bundle.test)
    x = torch.stack([bundle.test[i][0] for i in range(256)])
    with torch.no_grad():
        same = torch.equal(reloaded(x), shared(x))
    add("final, reloaded from disk", reloaded, final_path, t_load,
        f"load_artifact {t_load * 1000:.0f} ms; accuracy identical: {re_acc == final_acc}; "
        f"logits bit-identical: {same}", acc=re_acc)

    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    log2 = quantize(pruned, PowerOfTwo(bits=LOG2_BITS, keep_first_last=False), bundle.train,
                    train=epochs(SHARE_TRAIN)).eval()
    add("pruned + power-of-two levels", log2, save(log2, d, "log2"), t_prune + time.perf_counter() - t0,
        f"quant.log2 {LOG2_BITS} bits on every layer (levels fixed, biases fine-tuned); Huffman indices")
    tmp.cleanup()
    return out


def header_bytes(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 fine-tune epoch per stage")
    args = parser.parse_args()
    t0 = time.perf_counter()
    table = rows(args.quick)
    quick = " (--quick: 1 epoch per stage)" if args.quick else ""
    print(f"\nLeNet-5 on mnist5k: prune {SPARSITY:.1%} (global magnitude, AGP, {PRUNE_TRAIN.epochs:g} epochs Adam lr "
          f"{PRUNE_TRAIN.lr:g}) -> k-means conv {CONV_BITS} / fc {FC_BITS} bits ({SHARE_TRAIN.epochs:g} epochs "
          f"centroid fine-tune, lr {SHARE_TRAIN.lr:g}) -> Huffman{quick}."
          " seconds: cumulative pipeline time up to the row\n")
    print("| row | accuracy | drop (points) | artifact bytes | x smaller vs fp32 | seconds | settings / note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in table:
        print(f"| {r['row']} | {r['accuracy']:.2%} | {r['drop']:+.2f} | {r['bytes']:,} | {r['x_smaller']:.1f} | "
              f"{r['seconds']:.1f} | {r['note']} |")
    final = next(r for r in table if r["row"].endswith("(final)"))
    again = next(r for r in table if r["row"].startswith("final, reloaded"))
    ok = final["x_smaller"] >= TARGET_RATIO and final["drop"] <= TARGET_DROP and again["accuracy"] == final["accuracy"]
    print(f"\ntargets: >= {TARGET_RATIO:g}x smaller, drop <= {TARGET_DROP} points, reload identical -> "
          f"{'met' if ok else 'NOT met'} ({final['x_smaller']:.1f}x, {final['drop']:+.2f} points); "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
