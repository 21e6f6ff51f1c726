"""Distillation schemes beyond offline KD on mnist5k: self-distillation and quantization-aware distillation.

Rows (mnist5k: 4,000 training / 1,000 test digits; top-1 test accuracy):

* **self-distillation** (``distill.self``, exits picked automatically on LeNet-5: conv1, conv2, fc1;
  T=3, alpha=0.5) vs the same LeNet-5 trained on the labels alone, from the same initial
  weights, data order and ``TrainConfig`` (``EPOCHS`` epochs, Adam lr 3e-3, batch 32); one row
  per seed, mean over the seeds. The exit heads are dropped: both models have LeNet-5's size.
* **quantization-aware distillation** (``distill.qat``) vs plain QAT (``quant.qat``), both from
  the cached LeNet-5 baseline (``get_baseline``) with the same QAT config (``BITS`` weights,
  8-bit activations, per-channel LSQ, 50 observer steps) and ``TrainConfig(epochs=2, lr=3e-4)``;
  QAD's loss is the float model's softmax alone (the method's default T=1, alpha=1: no labels).

    python benchmarks/distill_schemes.py           # full run (~ a few minutes on 2 cores)
    python benchmarks/distill_schemes.py --quick   # smoke run
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

from modelpress import QAT, QuantAwareDistillation, SelfDistillation, TrainConfig, distill, quantize  # noqa: E402
from modelpress.core.data import Data  # noqa: E402
from modelpress.core.training import evaluate_accuracy, fit  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
from modelpress.zoo.baselines import get_baseline  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402
from modelpress.zoo.models import build_model  # noqa: E402

EPOCHS, SEEDS, BITS = 8, (0, 1, 2), 2


def self_distillation_rows(bundle, quick: bool) -> list[dict]:
    seeds = SEEDS[:1] if quick else SEEDS
    train = TrainConfig(epochs=1 if quick else EPOCHS, lr=3e-3, batch_size=32)
    plain, selfd, exits = [], [], None
    t0 = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        init = build_model("lenet5")
        data = Data(bundle.train, batch_size=train.batch_size, shuffle=True, seed=seed)
        torch.manual_seed(seed)
        plain.append(evaluate_accuracy(fit(copy.deepcopy(init), data, train), bundle.test))
        torch.manual_seed(seed)
        model, report = run_method(init, SelfDistillation(T=3.0, alpha=0.5), MethodInputs(data=data, train=train))
        selfd.append(evaluate_accuracy(model, bundle.test))
        exits = report.info["exits"]
    secs = time.perf_counter() - t0
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    return [
        {"task": "self", "row": f"LeNet-5 trained on labels ({train.epochs:g} epochs)", "acc": mean(plain),
         "std": std(plain), "per_seed": plain, "ref": None, "secs": secs / 2},
        {"task": "self", "row": f"LeNet-5 + distill.self (exits {', '.join(exits)}; heads dropped)", "acc": mean(selfd),
         "std": std(selfd), "per_seed": selfd, "ref": mean(plain), "secs": secs / 2},
    ]


def quant_aware_rows(bundle, quick: bool) -> list[dict]:
    base, _ = get_baseline("lenet5", bundle)
    base.eval()
    float_acc = evaluate_accuracy(base, bundle.test)
    qcfg = QAT(weight_bits=BITS, act_bits=8, observer_steps=10 if quick else 50)
    train = TrainConfig(epochs=0.2 if quick else 2, lr=3e-4, batch_size=32)
    data = Data(bundle.train, batch_size=train.batch_size, shuffle=True, seed=0)
    out = [{"task": "qad", "row": "LeNet-5 float (cached baseline)", "acc": float_acc, "std": None,
            "per_seed": [float_acc], "ref": None, "secs": 0.0}]
    for label, make in [(f"quant.qat W{BITS}A8 (labels)", lambda: quantize(base, qcfg, data, train=train)),
                        (f"distill.qat W{BITS}A8 (float model teaches, T=1, no labels)",
                         lambda: distill(base, QuantAwareDistillation(quant=qcfg), data, train=train))]:
        torch.manual_seed(0)
        t = time.perf_counter()
        model = make()
        acc = evaluate_accuracy(model, bundle.test)
        out.append({"task": "qad", "row": label, "acc": acc, "std": None, "per_seed": [acc], "ref": float_acc,
                    "secs": time.perf_counter() - t})
    return out


def rows(quick: bool = False) -> list[dict]:
    bundle = load_dataset("mnist5k")
    return self_distillation_rows(bundle, quick) + quant_aware_rows(bundle, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, short training")
    args = parser.parse_args()
    t0 = time.perf_counter()
    print("| scheme | model / training | test acc | vs reference | per seed | s |")
    print("|---|---|---|---|---|---|")
    for r in rows(args.quick):
        spread = r["std"] is not None and len(r["per_seed"]) > 1
        acc = f"{r['acc']:.2%}" + (f" +- {r['std'] * 100:.2f}" if spread else "")
        ref = "" if r["ref"] is None else f"{(r['acc'] - r['ref']) * 100:+.2f} pt"
        print(f"| {r['task']} | {r['row']} | {acc} | {ref} | {', '.join(f'{a:.2%}' for a in r['per_seed'])} | "
              f"{r['secs']:.0f} |")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
