"""Unstructured pruning of LeNet-5 on mnist5k: modelpress criteria vs torch.nn.utils.prune.

Every row starts from the same cached baseline (``get_baseline("lenet5", mnist5k)``), prunes
conv2, fc1 and fc2 (first conv and classifier dense, modelpress's default) and fine-tunes
with the same TrainConfig, seeded identically:

* modelpress ``prune.magnitude`` at 90%, global ranking, AGP (polynomial) schedule during
  the fine-tune, and the same one-shot (pruned once, then fine-tuned);
* ``torch.nn.utils.prune.global_unstructured`` (L1Unstructured) at 90% on the same layers,
  one-shot, fine-tuned by a plain loop with the same optimizer, schedule and batches
  (torch's forward pre-hook keeps the mask); stored with ``torch.save`` of the state_dict
  after ``prune.remove``, i.e. dense;
* ``prune.taylor``, ``prune.snip`` and ``prune.random`` at 90% with the same AGP schedule;
* SNIP as the paper uses it: 90% of a fresh LeNet-5 pruned at init from one batch, then
  trained from scratch exactly like the dense baseline (masks kept during training);
* ``prune.magnitude`` at 90% with per-layer sparsities from a sensitivity scan
  (``ratios_for_target``; scanned on 1,000 training images, never the test set);
* ``prune.nm`` 2:4 (conv2's 150-long rows treated as zero-padded, ``incompatible="pad"``), one-shot
  then fine-tuned; the pattern is verified after the fine-tune.

"seconds" is wall time (prune + fine-tune) and moves with machine load.
"bytes" is the modelpress artifact (``save_artifact``; each tensor stored raw, as bitmask +
values or as relative indices + values, whichever is smallest) and "x smaller" compares it
with the dense fp32 state_dict. A second table compares the two sparse encodings alone.

    python benchmarks/pruning_unstructured.py            # full run (~45 s on 2 idle CPU cores)
    python benchmarks/pruning_unstructured.py --quick    # 1 fine-tune epoch per row
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

from modelpress import MagnitudePruning, Polynomial, TrainConfig, prune  # noqa: E402
from modelpress.artifact import checkpoint  # noqa: E402
from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.core.masks import strip_masks  # noqa: E402
from modelpress.core.training import evaluate_accuracy, fit  # noqa: E402
from modelpress.pruning.criteria import RandomPruning, SNIPPruning, TaylorPruning  # noqa: E402
from modelpress.pruning.nm import NMSparsity, verify_nm  # noqa: E402
from modelpress.pruning.sensitivity import SensitivityConfig, sensitivity_scan  # noqa: E402
from modelpress.zoo.baselines import DEFAULT_TRAIN, get_baseline, train_model  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402
from modelpress.zoo.models import build_model  # noqa: E402

LAYERS = ("conv2", "fc1", "fc2")
SPARSITY = 0.9


def state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def artifact_bytes(model, auto: list[str] | None = None) -> int:
    """Bytes of the model's artifact; ``auto`` restricts the encodings save may choose from."""
    saved = list(checkpoint._AUTO)
    if auto is not None:
        checkpoint._AUTO[:] = auto
    try:
        with tempfile.TemporaryDirectory() as d:
            return save_artifact(strip_masks(copy.deepcopy(model)), Path(d) / "m.safetensors").stat().st_size
    finally:
        checkpoint._AUTO[:] = saved


def sparsity_of(model) -> float:
    ws = [getattr(model, n).weight for n in LAYERS]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def torch_global_unstructured(base, train_set, cfg: TrainConfig, seed: int):
    """PyTorch's own global L1 pruning + a plain fine-tune loop matching modelpress's fit
    (the same helper peers.py uses); returns the model and its torch.save bytes."""
    from peers import torch_prune_global_l1

    model = torch_prune_global_l1(base, LAYERS, SPARSITY, train_set, cfg, cfg.epochs, seed)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return model.eval(), buf.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 fine-tune epoch per row instead of 6")
    args = parser.parse_args()

    bundle = load_dataset("mnist5k")
    base, base_path = get_baseline("lenet5", bundle)
    base.eval()
    dense_acc = evaluate_accuracy(base, bundle.test)
    dense_bytes = state_bytes(base)
    train = TrainConfig(epochs=1 if args.quick else 6, lr=1e-3)
    agp = Polynomial(end_fraction=0.6, frequency=25)
    seed = 0
    rows = []

    def add(name, model, seconds, size=None, note=""):
        acc = evaluate_accuracy(model, bundle.test)
        size = size if size is not None else artifact_bytes(model)
        rows.append((name, sparsity_of(model), acc, 100 * (dense_acc - acc), size, dense_bytes / size, seconds, note))

    def run_modelpress(name, cfg, note=""):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        # one-shot methods are fine-tuned after pruning (the masks keep the zeros)
        model = prune(base, cfg, bundle.train, train=train)
        add(name, model.eval(), time.perf_counter() - t0, note=note)
        return model

    # Warm-up: torch imports part of itself on the first optimizer step; don't bill it to row 1.
    fit(copy.deepcopy(base), bundle.train, TrainConfig(max_steps=2))

    rows.append(("dense baseline", 0.0, dense_acc, 0.0, artifact_bytes(base), dense_bytes / artifact_bytes(base),
                 0.0, f"cached: {base_path.name}"))
    run_modelpress("magnitude global AGP", MagnitudePruning(sparsity=SPARSITY, schedule=agp))
    run_modelpress("magnitude global one-shot", MagnitudePruning(sparsity=SPARSITY))

    t0 = time.perf_counter()
    tmodel, tbytes = torch_global_unstructured(base, bundle.train, train, seed)
    add("torch global_unstructured L1", tmodel, time.perf_counter() - t0, size=tbytes,
        note=f"torch.save after prune.remove (dense); as modelpress artifact: {artifact_bytes(tmodel):,} B")

    run_modelpress("taylor global AGP", TaylorPruning(sparsity=SPARSITY, schedule=agp))
    run_modelpress("snip global AGP", SNIPPruning(sparsity=SPARSITY, schedule=agp),
                   note="SNIP scores on a trained net, not at init")
    run_modelpress("random global AGP", RandomPruning(sparsity=SPARSITY, schedule=agp))

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    at_init = prune(build_model("lenet5"), SNIPPruning(sparsity=SPARSITY, batches=1), bundle.train)
    scratch = DEFAULT_TRAIN.model_copy(update={"epochs": 1}) if args.quick else DEFAULT_TRAIN
    train_model(at_init, bundle, scratch, seed)  # the dense baseline's own training recipe
    add("snip at init + train from scratch", at_init, time.perf_counter() - t0,
        note=f"trained {scratch.epochs:g} epochs, lr {scratch.lr:g}, like the baseline")

    t0 = time.perf_counter()
    scan_data = Subset(bundle.train, range(1000))
    sens = sensitivity_scan(base, scan_data, SensitivityConfig(sparsities=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98]))
    ratios = sens.ratios_for_target(SPARSITY)
    scan_s = time.perf_counter() - t0
    m = run_modelpress("magnitude sensitivity ratios AGP",
                       MagnitudePruning(sparsity=SPARSITY, layer_sparsity=ratios, schedule=agp),
                       note=", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + f"; scan {scan_s:.0f} s")
    rows[-1] = rows[-1][:6] + (rows[-1][6] + scan_s,) + rows[-1][7:]
    del m

    nm = run_modelpress("2:4 N:M one-shot", NMSparsity(n=2, m=4, incompatible="pad"))
    ok = all(verify_nm(getattr(nm, n).weight, 2, 4) for n in LAYERS)
    rows[-1] = rows[-1][:7] + (f"pattern verified after fine-tune: {ok}; conv2 rows padded 150->152",)

    print(f"\nLeNet-5 on mnist5k, fine-tune {train.epochs:g} epochs (Adam lr {train.lr:g}, cosine), "
          f"dense fp32 state_dict {dense_bytes:,} B\n")
    print("| method | sparsity (conv2+fc1+fc2) | test acc | drop (points) | bytes | x smaller | seconds | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, sp, acc, drop, size, ratio, sec, note in rows:
        print(f"| {name} | {sp:.1%} | {acc:.2%} | {drop:+.2f} | {size:,} | {ratio:.1f} | {sec:.0f} | {note} |")

    print("\nSparse encodings alone (one-shot global magnitude on the baseline; artifact bytes)\n")
    print("| sparsity | bitmask + values | relative index + values | auto (smallest per tensor) | chosen |")
    print("|---:|---:|---:|---:|---|")
    for s in (0.9, 0.95):
        p = strip_masks(prune(base, MagnitudePruning(sparsity=s)))
        with tempfile.TemporaryDirectory() as d:
            header = checkpoint.read_header(save_artifact(p, Path(d) / "m.safetensors"))
        chosen = ", ".join(f"{k}: {v['kind']}" + (f"/{v['bits']}b" if "bits" in v else "")
                           for k, v in header["encodings"].items())
        print(f"| {s:.0%} | {artifact_bytes(p, ['sparse']):,} | {artifact_bytes(p, ['relidx']):,} | "
              f"{artifact_bytes(p):,} | {chosen} |")


if __name__ == "__main__":
    main()
