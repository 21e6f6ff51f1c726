"""LeNet-5 as LiteRT files in the four precisions of ``modelpress export --format tflite`` (issue 17).

The trained zoo baseline (``lenet5`` on ``--data``, trained and cached like ``modelpress train``)
is exported by :func:`modelpress.export.tflite.export_tflite` as fp32, fp16, dynamic-range int8
and int8 (calibrated on 8 batches of 32 training images). Columns: file bytes, gzip -9 bytes (how
TF Model Optimization reports size), the export's own check (LiteRT vs PyTorch on 8 test images),
test accuracy in the LiteRT interpreter (every test image, one at a time) next to PyTorch's, top-1
agreement with PyTorch over the test split, and batch-1 latency: LiteRT interpreter (XNNPACK,
1 thread) and eager PyTorch (1 thread), timed alternately in one process by ``compare_latency``.

    python benchmarks/tflite_lenet5.py                  # digits (1,797 8x8 digits at 28x28), ~1 min
    python benchmarks/tflite_lenet5.py --data mnist5k   # the issue's split (1,000 test images)

Needs the [tflite] extra.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.core.data import Data, split_batch  # noqa: E402
from modelpress.export.tflite import PRECISIONS, LiteRTRunner, TfliteOptions, export_tflite  # noqa: E402
from modelpress.recipes.resolve import resolve_data  # noqa: E402
from modelpress.zoo.baselines import get_baseline  # noqa: E402


def litert_accuracy(path: Path, model: torch.nn.Module, test) -> tuple[float, float, float]:
    """(LiteRT accuracy, PyTorch accuracy, top-1 agreement) over the whole test split, batch 1."""
    runner = LiteRTRunner(path)
    hits = ref_hits = agree = n = 0
    for batch in Data(test, batch_size=256):
        x, y = split_batch(batch)
        with torch.no_grad():
            ref = model(x).argmax(1).numpy()
        got = np.array([runner(x[i:i + 1]).argmax(1)[0] for i in range(len(x))])
        hits += int((got == y.numpy()).sum())
        ref_hits += int((ref == y.numpy()).sum())
        agree += int((got == ref).sum())
        n += len(x)
    return hits / n, ref_hits / n, agree / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = resolve_data(args.data, 0)
    model, _ = get_baseline("lenet5", bundle, seed=0)
    model.eval()
    x1 = bundle.example_inputs(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            done = export_tflite(model, bundle.example_inputs(8), Path(tmp) / f"lenet5-{precision}.tflite",
                                 TfliteOptions(precision=precision), calibration=bundle.train)
            acc, ref_acc, agree = litert_accuracy(done.path, model, bundle.test)
            cmp = compare_latency(model, str(done.path), x1, warmup=20, repeats=200, min_time_s=1.0,
                                  threads=args.threads)
            rows.append((precision, done.bytes, done.gzip_bytes, done.check.sqnr_db, acc, ref_acc, agree,
                         cmp.b.median_ms, cmp.a.median_ms))
    print(f"lenet5 on {bundle.name}: LiteRT files from modelpress export --format tflite "
          f"({args.threads} thread{'s' if args.threads > 1 else ''}, batch 1)\n")
    print("| precision | bytes | gzip bytes | check SQNR dB | LiteRT acc | PyTorch acc | top-1 agree "
          "| LiteRT ms | PyTorch ms |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for p, b, gz, db, acc, ref_acc, agree, ms, ref_ms in rows:
        print(f"| {p} | {b:,} | {gz:,} | {db:.1f} | {100 * acc:.2f}% | {100 * ref_acc:.2f}% | {100 * agree:.1f}% "
              f"| {ms:.3f} | {ref_ms:.3f} |")


if __name__ == "__main__":
    main()
