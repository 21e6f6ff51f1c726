"""Static W8A8 post-training quantization deployed to ONNX Runtime: modelpress vs ORT's quantize_static.

For LeNet-5 and resnet_small on mnist5k (the shared cached baselines, ``get_baseline``):

* fp32: the model exported with ``export_onnx`` (ONNX Runtime folds its BatchNorm);
* modelpress ``quant.static_int8`` with each activation observer (minmax, moving_minmax,
  percentile 99.99, mse, kl), other fields at their defaults (per-channel symmetric 7-bit-range
  int8 weights, asymmetric uint8 activations, BatchNorm folded), exported with
  ``export_int8_onnx`` (QDQ); plus, for LeNet-5, the mse row with its first conv left in float;
* ONNX Runtime's ``quantize_static`` on the same fp32 ONNX file with the same calibration images:
  CalibrationMethod MinMax, Entropy and Percentile, QDQ format, ``per_channel=True``, uint8
  activations, int8 weights, ``reduce_range=True`` (the settings modelpress deploys); and MinMax
  with ORT's own defaults for the types (int8 activations, full-range weights).

Calibration: the first 512 training images (8 batches of 64). Accuracy: top-1 on the 1,000 test
images, computed by ONNX Runtime on the int8 file (what is deployed, not the fake-quant model);
"drop" is fp32 minus int8 in points; the notes give the modelpress fake-quant model's own
accuracy in PyTorch, which should equal the deployed one. Size: the .onnx file in bytes. Latency: ``compare_latency``
of the fp32 file against the int8 file (ONNX Runtime, CPU, ORT_ENABLE_ALL, batch 64, alternating
calls), at 1 and 2 intra-op threads; "x" = fp32 median / int8 median (> 1: int8 is faster).

    python benchmarks/quant_static.py            # full run
    python benchmarks/quant_static.py --quick    # smoke run: LeNet-5, two observers, short timings
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

from modelpress import Scope, quantize  # noqa: E402
from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.export.onnx import export_onnx, ort_session  # noqa: E402
from modelpress.export.onnx_quant import export_int8_onnx  # noqa: E402
from modelpress.quantization.static import StaticInt8  # noqa: E402
from modelpress.zoo.baselines import get_baseline  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402

OBSERVERS = ("minmax", "moving_minmax", "percentile", "mse", "kl")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
CALIB_IMAGES, BATCH = 512, 64


def ort_accuracy(path, x: np.ndarray, y: np.ndarray) -> float:
    out = ort_session(path, threads=None).run(None, {"input": x})[0]
    return float((out.argmax(1) == y).mean())


def ort_quantize_static(fp32: Path, dest: Path, calib: list[np.ndarray], method: str, ort_defaults: bool = False):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": b} for b in calib)

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" notice on every call
    types = {} if ort_defaults else {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8,
                                     "reduce_range": True}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # histogram progress prints
        quantize_static(str(fp32), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=getattr(CalibrationMethod, method), **types)
    return dest


def latency(fp32, int8, x64, repeats: int, min_time_s: float) -> dict:
    out = {}
    for threads in (1, 2):
        cmp = compare_latency(str(fp32), str(int8), x64, threads=threads, warmup=5, repeats=repeats,
                              min_time_s=min_time_s)
        out[threads] = (cmp.a.median_ms, cmp.b.median_ms, cmp.ratio)
    return out


def model_rows(name: str, bundle, workdir: Path, quick: bool) -> list[dict]:
    base, _ = get_baseline(name, bundle)
    base.eval()
    calib_t = [torch.stack([bundle.train[i][0] for i in range(j, j + BATCH)]) for j in range(0, CALIB_IMAGES, BATCH)]
    calib_np = [c.numpy() for c in calib_t]
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    y = np.array([int(bundle.test[i][1]) for i in range(len(bundle.test))])
    x_np, x64 = x.numpy(), x[:BATCH]
    repeats, min_t = (5, 0.0) if quick else (20, 1.0)

    fp32 = export_onnx(base, x64, workdir / f"{name}-fp32.onnx")
    acc0 = ort_accuracy(fp32, x_np, y)
    rows = [{"model": name, "row": "fp32 (ONNX Runtime)", "acc": acc0, "bytes": fp32.stat().st_size, "lat": None}]

    variants = [(f"modelpress static_int8 {obs}", StaticInt8(observer=obs)) for obs in
                (("minmax", "mse") if quick else OBSERVERS)]
    if name == "lenet5" and not quick:
        variants.append(("modelpress static_int8 mse, conv1 float",
                         StaticInt8(observer="mse", scope=Scope(exclude=["conv1"]))))
    for label, cfg in variants:
        t = time.perf_counter()
        q = quantize(base, cfg, calib_t)
        path = export_int8_onnx(q, x64, workdir / f"{name}-{label.split()[-1]}-{len(rows)}.onnx")
        secs = time.perf_counter() - t
        with torch.no_grad():
            acc_fq = float((q(x).argmax(1).numpy() == y).mean())
        rows.append({"model": name, "row": label, "acc": ort_accuracy(path, x_np, y), "bytes": path.stat().st_size,
                     "lat": latency(fp32, path, x64, repeats, min_t),
                     "note": f"torch fake-quant {acc_fq:.2%}; calibrate + export {secs:.1f}s"})

    ort_variants = [(m, False) for m in (ORT_METHODS[:1] if quick else ORT_METHODS)]
    if not quick:
        ort_variants.append(("MinMax", True))
    for method, defaults in ort_variants:
        t = time.perf_counter()
        path = ort_quantize_static(fp32, workdir / f"{name}-ort-{method}-{defaults}.onnx", calib_np, method, defaults)
        secs = time.perf_counter() - t
        label = f"ORT quantize_static {method}" + (" (ORT default types: s8s8, full range)" if defaults else "")
        rows.append({"model": name, "row": label, "acc": ort_accuracy(path, x_np, y), "bytes": path.stat().st_size,
                     "lat": latency(fp32, path, x64, repeats, min_t), "note": f"calibrate {secs:.1f}s"})
    for r in rows:
        r["drop"] = (acc0 - r["acc"]) * 100
    return rows


def rows(quick: bool) -> list[dict]:
    """One dict per table row: model, row, acc, drop (points), bytes, lat {threads: (fp32 ms, int8 ms, x)}."""
    bundle = load_dataset("mnist5k")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        out = []
        for name in (("lenet5",) if quick else ("lenet5", "resnet_small")):
            out += model_rows(name, bundle, Path(d), quick)
    return out


def fmt_lat(lat, threads: int) -> str:
    if lat is None:
        return "-"
    a, b, r = lat[threads]
    return f"{a:.2f} / {b:.2f} ms ({r:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: LeNet-5, two observers, few timings")
    args = parser.parse_args()
    t0 = time.perf_counter()
    table = rows(args.quick)
    header = ["model", "method", "accuracy (ORT)", "drop (pt)", "size (bytes)",
              "fp32 / int8, 1 thread", "fp32 / int8, 2 threads", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        cells = [r["model"], r["row"], f"{r['acc']:.2%}", f"{r['drop']:+.2f}", f"{r['bytes']:,}",
                 fmt_lat(r["lat"], 1), fmt_lat(r["lat"], 2), r.get("note", "")]
        print("| " + " | ".join(cells) + " |")
    import onnxruntime

    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPU cores, batch {BATCH}, "
          f"{CALIB_IMAGES} calibration images")


if __name__ == "__main__":
    main()
