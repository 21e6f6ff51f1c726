"""Weight quantization beyond round-to-nearest: AdaRound, QAT and mixed precision on mnist5k.

Rows, for the cached baselines ``lenet5`` and ``resnet_small`` (``get_baseline(name, mnist5k)``):

* fp32: the baseline itself;
* ``quant.weight_only`` int8 and int4, per-channel, symmetric, round-to-nearest (min-max ranges),
  every Linear/Conv2d quantized (first and last too);
* ``quant.adaround`` int4 (MSE ranges, 500 iterations per layer) with bias correction;
* ``quant.qat`` W4A8: int4 per-channel LSQ weights, uint8 per-tensor inputs of every layer,
  ranges observed for 50 steps, BN statistics frozen, ``TrainConfig(epochs=2, lr=3e-4,
  batch_size=64)``, then converted to packed layers that keep the input quantizers;
* ``quant.mixed_precision`` with candidates 2/4/8 bits and a budget of 1/6 of the fp32 weight
  bytes (KL-to-float sensitivity on 4 calibration batches);
* int3 round-to-nearest vs int3 AdaRound: below 4 bits, where rounding matters on these models.

Calibration data: the first batches of 64 training images (seeded shuffle). Accuracy is top-1
on the 1,000 test images; "drop" is fp32 minus quantized, in points. "artifact" is the
modelpress artifact on disk (``save_artifact``: packed integers + fp32 scales, biases, BN);
"x smaller" compares it with the fp32 state_dict bytes. Every quantized artifact is reloaded
and checked to give bit-identical outputs. "seconds" is the time the method took (QAT
includes its training), on one CPU thread by default: these tiny models gain little from more,
and on a shared machine two threads can run several times slower when another process takes a
core (measured: 29 s vs up to 175 s for one AdaRound run on resnet_small).

    python benchmarks/quant_training.py            # full run (about 3 minutes on one CPU thread)
    python benchmarks/quant_training.py --quick    # smoke run: few iterations and steps
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

from modelpress import TrainConfig  # noqa: E402
from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.artifact.loading import load_artifact  # noqa: E402
from modelpress.core.data import Data  # noqa: E402
from modelpress.core.training import evaluate_accuracy  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
from modelpress.quantization.adaround import AdaRound  # noqa: E402
from modelpress.quantization.mixed import MixedPrecision  # noqa: E402
from modelpress.quantization.qat import QAT  # noqa: E402
from modelpress.quantization.weight_only import WeightOnly  # noqa: E402
from modelpress.zoo.baselines import get_baseline  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402

MODELS = ("lenet5", "resnet_small")


def state_dict_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def artifact_bytes_checked(model, x: torch.Tensor) -> int:
    """Artifact size; the artifact must reload to a model giving identical outputs."""
    with tempfile.TemporaryDirectory() as d:
        path = save_artifact(model, Path(d) / "m.safetensors")
        again, _ = load_artifact(path)
        with torch.no_grad():
            if not torch.equal(again(x), model.eval()(x)):
                raise AssertionError("the reloaded artifact computes different outputs")
        return path.stat().st_size


def methods(quick: bool) -> list[tuple[str, object, TrainConfig | None]]:
    iters = 20 if quick else 500
    qat_train = TrainConfig(epochs=2, lr=3e-4, batch_size=64, max_steps=10 if quick else None)
    return [
        ("int8 weight-only (RTN, per-channel)", WeightOnly(bits=8), None),
        ("int4 weight-only (RTN, per-channel)", WeightOnly(bits=4), None),
        (f"int4 AdaRound ({iters} it/layer) + bias correction", AdaRound(bits=4, iterations=iters), None),
        ("QAT W4A8 (LSQ, 2 epochs)" if not quick else "QAT W4A8 (LSQ, 10 steps)",
         QAT(weight_bits=4, act_bits=8, observer_steps=5 if quick else 50, freeze_bn_after=0), qat_train),
        ("mixed 2/4/8 bits, budget 1/6 of fp32", MixedPrecision(budget_ratio=1 / 6), None),
        ("int3 weight-only (RTN, per-channel)", WeightOnly(bits=3), None),
        (f"int3 AdaRound ({iters} it/layer) + bias correction", AdaRound(bits=3, iterations=iters), None),
    ]


def rows(quick: bool) -> list[dict]:
    """One dict per (model, method): accuracy, drop (points), artifact bytes, x smaller, seconds."""
    bundle = load_dataset("mnist5k")
    calib = Data(bundle.train, batch_size=64, shuffle=True, seed=0)
    x_check = torch.stack([bundle.test[i][0] for i in range(32)])
    out = []
    for name in MODELS:
        base, _ = get_baseline(name, bundle)
        base.eval()
        acc0 = evaluate_accuracy(base, bundle.test)
        fp_bytes = state_dict_bytes(base)
        out.append({"model": name, "method": "fp32", "accuracy": acc0, "drop": 0.0,
                    "artifact_bytes": artifact_bytes_checked(base, x_check), "x_smaller": 1.0, "seconds": 0.0,
                    "note": f"{fp_bytes:,} B fp32 state_dict"})
        for label, cfg, train in methods(quick):
            torch.manual_seed(0)
            t = time.perf_counter()
            q, report = run_method(base, cfg, MethodInputs(data=calib, train=train))
            seconds = time.perf_counter() - t
            acc = evaluate_accuracy(q, bundle.test)
            size = artifact_bytes_checked(q, x_check)
            note = ""
            if isinstance(cfg, MixedPrecision):
                note = "bits " + "/".join(str(r["bits"]) for r in report.info["layers"])
            elif isinstance(cfg, AdaRound):
                layers = report.info["layers"].values()
                ratio = sum(r["mse_adaround"] for r in layers) / sum(r["mse_rtn"] for r in layers)
                note = f"layer output MSE {ratio:.2f}x of RTN"
            out.append({"model": name, "method": label, "accuracy": acc, "drop": (acc0 - acc) * 100,
                        "artifact_bytes": size, "x_smaller": fp_bytes / size, "seconds": seconds, "note": note})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few AdaRound iterations, 10 QAT steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    table = rows(args.quick)
    header = ["model", "method", "accuracy", "drop (pt)", "artifact (bytes)", "x smaller vs fp32", "seconds",
              "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        cells = [r["model"], r["method"], f"{r['accuracy']:.2%}", f"{r['drop']:+.1f}", f"{r['artifact_bytes']:,}",
                 f"{r['x_smaller']:.2f}", f"{r['seconds']:.1f}", r["note"]]
        print("| " + " | ".join(cells) + " |")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
