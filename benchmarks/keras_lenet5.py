"""The seeds' Keras LeNet-5 to LiteRT: TF Model Optimization against modelpress, one table (issue 17).

1. The split: mnist5k (4,000 / 1,000, seed 0) as raw [0, 1] NHWC pixels in an ``.npz``.
2. TFMOT (``benchmarks/keras_lenet5_tfmot.py`` in the TensorFlow venv, ``constraints-tf.txt``) trains
   the seeds' LeNet-5 with tf_keras, saves it as ``lenet5.h5`` and writes its int8 rows (PTQ,
   pruning 80% / 90%, clustering, QAT, PCQAT) as ``.tflite`` files; ``--tfmot-dir`` reuses a run.
3. modelpress on the same ``lenet5.h5``: the built-in recipe ``lenet5-litert`` run as
   ``modelpress compress -r lenet5-litert -m keras:lenet5.h5?channels_first=true`` does it
   (every training step distilled from the Keras model: the dense layers' neurons cut 30%, global
   magnitude pruning to 80% on a polynomial schedule, k-means weight sharing (conv 4 bits, dense 2),
   then ``RUN/model.tflite`` int8 with one weight scale per layer (the shared weights stay few
   distinct bytes) and without the inner tensors' debug names; ``--set`` changes the recipe); and
   modelpress's plain int8 export of the fp32 model.

Columns: LiteRT accuracy on the 1,000 test images (batch 1), ``.tflite`` bytes, gzip -9 bytes, and
batch-1 latency in the LiteRT interpreter (1 thread; every file timed in turns, call by call, in
this process, so the rows compare). Run with the ``[tflite]`` and ``[keras]`` extras installed:

    python benchmarks/keras_lenet5.py --tf-python /work/tf-venv/bin/python     # ~10 min on 2 cores
    python benchmarks/keras_lenet5.py --tfmot-dir /work/tfmot-run              # reuse TFMOT's run
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modelpress import compress  # noqa: E402
from modelpress.artifact.loading import load_model  # noqa: E402
from modelpress.export.tflite import LiteRTRunner, TfliteOptions, export_tflite  # noqa: E402
from modelpress.recipes.schema import Recipe  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPE = "lenet5-litert"


def write_split(path: Path, seed: int = 0) -> None:
    """mnist5k's split as raw pixels / 255, NHWC (what the Keras model is trained on)."""
    b = load_dataset("mnist5k?normalize=false", seed=seed)
    arrays = {}
    for split in ("train", "test"):
        x, y = getattr(b, split).tensors
        arrays[f"x_{split}"] = x.numpy().transpose(0, 2, 3, 1).astype(np.float32)
        arrays[f"y_{split}"] = y.numpy().astype(np.int64)
    np.savez_compressed(path, **arrays)


def tfmot_rows(folder: Path, tf_python: str | None, quick: bool) -> list[dict]:
    if not (folder / "tfmot_rows.json").exists():
        if not tf_python:
            raise SystemExit(f"no TFMOT run in {folder}: pass --tf-python (the TensorFlow venv's python)")
        split = folder / "mnist5k_seed0.npz"
        write_split(split)
        subprocess.run([tf_python, str(HERE / "keras_lenet5_tfmot.py"), "--data", str(split), "--out", str(folder),
                        *(["--quick"] if quick else [])], check=True)
    rows = json.loads((folder / "tfmot_rows.json").read_text())
    return [{"name": f"TFMOT {r['name']}", "path": r.get("tflite") or r.get("path"), "note": r.get("note", "")}
            for r in rows if (r.get("tflite") or r.get("path"))]


def litert_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    runner = LiteRTRunner(path)
    nhwc = runner.takes_nhwc(x[:1])
    pred = np.array([runner(x[i:i + 1], channels_last=nhwc).argmax(1)[0] for i in range(len(x))])
    return float((pred == y.numpy()).mean())


def modelpress_rows(h5: Path, out: Path, args) -> list[dict]:
    torch.manual_seed(0)
    bundle = load_dataset("mnist5k?normalize=false")
    teacher = load_model(f"keras:{h5}?channels_first=true").eval()
    rows = []
    plain = export_tflite(teacher, bundle.example_inputs(8), out / "modelpress_int8.tflite",
                          TfliteOptions(precision="int8"), calibration=bundle.train)
    rows.append({"name": "modelpress int8 of the fp32 model", "path": str(plain.path), "note": "export_tflite int8"})
    t0 = time.perf_counter()
    recipe = Recipe.load(RECIPE, [*args.overrides, *(["stage.1.finetune.epochs=1", "stage.2.finetune.epochs=1",
                                                      "stage.3.finetune.epochs=1"] if args.quick else [])])
    run = compress(f"keras:{h5}?channels_first=true", recipe, out=out / "run")
    secs = time.perf_counter() - t0
    rows.append({"name": f"modelpress recipe {RECIPE} (dense neurons cut 30%, 80% sparse, k-means conv 4 / dense "
                         "2 bits, distilled; int8 per layer)", "path": str(run.deployed.path),
                 "note": f"`modelpress compress -r {RECIPE}`; {secs:.0f}s"})
    return rows


def timed(paths: list[str], x1: torch.Tensor, calls: int) -> list[float]:
    """Median batch-1 ms per file, the files taking turns call by call."""
    runners = [LiteRTRunner(p, threads=1) for p in paths]
    feeds = [r.feeds(x1, channels_last=r.takes_nhwc(x1)) for r in runners]
    times = [[] for _ in runners]
    for i in range(calls + 50):
        for k, (r, f) in enumerate(zip(runners, feeds)):
            t = time.perf_counter()
            r.invoke(f)
            if i >= 50:
                times[k].append(time.perf_counter() - t)
    return [1000 * float(np.median(t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tfmot-dir", type=Path, default=None, help="a keras_lenet5_tfmot.py run (else a new one)")
    ap.add_argument("--tf-python", default=None, help="python of the TensorFlow venv (constraints-tf.txt)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help=f"override the recipe {RECIPE}, as `modelpress compress --set`")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.tfmot_dir or Path(tmp) / "tfmot"
        folder.mkdir(parents=True, exist_ok=True)
        rows = tfmot_rows(folder, args.tf_python, args.quick)
        rows += modelpress_rows(folder / "lenet5.h5", Path(tmp), args)
        bundle = load_dataset("mnist5k?normalize=false")
        x, y = bundle.test.tensors
        for r in rows:
            data = Path(r["path"]).read_bytes()
            r.update(acc=litert_accuracy(Path(r["path"]), x, y), bytes=len(data), gz=len(gzip.compress(data, 9)))
        for r, ms in zip(rows, timed([r["path"] for r in rows], x[:1], args.calls)):
            r["ms"] = ms
    print("The seeds' Keras LeNet-5 on mnist5k as .tflite files (LiteRT interpreter, 1,000 test images, batch 1, "
          "1 thread)\n")
    print("| row | LiteRT acc | .tflite bytes | gzip bytes | ms | note |")
    print("|---|--:|--:|--:|--:|---|")
    for r in rows:
        print(f"| {r['name']} | {100 * r['acc']:.2f}% | {r['bytes']:,} | {r['gz']:,} | {r['ms']:.4f} | {r['note']} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
