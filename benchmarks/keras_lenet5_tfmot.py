"""TF Model Optimization (TFMOT 0.8) on the seeds' Keras LeNet-5: the peer of issue 17, as int8 LiteRT files.

The seeds' LeNet-5 (``tf_keras``, Keras 2: TFMOT 0.8 supports nothing newer) is trained on a split
file, then compressed with TFMOT's documented recipes, each row converted to a ``.tflite`` by
``TFLiteConverter.from_keras_model``: full int8 (weights and activations, calibrated on 200 training
images, float32 input/output so every file takes the same float images), except the fp32 reference.

====  ===========================================================================================
a     Keras fp32, plain float32 .tflite
b     the fp32 model, post-training full int8
c     ``prune_low_magnitude`` PolynomialDecay 50% -> 80%, fine-tuned, ``strip_pruning``, int8
d     the same to 90%
e     c + sparsity-preserving clustering (16 clusters, k-means++), fine-tuned, ``strip_clustering``
f     QAT (``quantize_model``) of the fp32 model, fine-tuned
g     e + PCQAT (``Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True)``), fine-tuned
====  ===========================================================================================

Columns: accuracy in the LiteRT interpreter on every test image (batch 1), file bytes, gzip -9
bytes (how TFMOT's guides report size), batch-1 latency (1 thread; median of 1,000 calls of
set-input + invoke + get-output after 100 warm-up calls, the files taking turns call by call;
``ai_edge_litert`` when installed, else ``tf.lite.Interpreter``) and, read back from each file, the
sparsity of the conv/dense kernels and their unique values per kernel (per-channel int8 scales turn
16 float clusters into more int8 codes). A stage that fails gives rows saying why; the others run.

Training (seeded, ``enable_op_determinism``; batch 32, Adam, sparse categorical cross-entropy,
no validation split): the fp32 model 15 epochs at lr 1e-3 (97.6% on mnist5k). Fine-tuning follows
the TFMOT guides' optimizers (``"adam"``, lr 1e-3 for pruning, clustering, QAT and PCQAT as in the
pruning_with_keras / sparse_clustering / pcqat examples); their 2-3 epochs over 54,000 MNIST images
are ~1,000 steps, so on 4,000 images: pruning 8 epochs (the sparsity ramps over the first 6, every
10 steps, and holds for the last 2), clustering 5, QAT and PCQAT 3 (1,000 / 625 / 375 steps).
TFMOT 0.8.1's ``ClusterWeights`` wrapper drops the ``training`` argument, so the Dropout layers stay
off while the clustered model is fine-tuned (they work in the other stages).

    /work/tf-venv/bin/python benchmarks/keras_lenet5_tfmot.py --data SPLIT.npz --out DIR \\
        [--quick] [--keras3-python /path/to/keras3-venv/bin/python]

``--quick``: 1 epoch per stage, 200 timed calls (a smoke run). ``--keras3-python``: also load
DIR/lenet5.h5 (tf_keras's legacy HDF5) in Keras 3 with the torch backend in that interpreter and
compare its outputs with tf_keras's on 8 test images (DIR/keras3_check.json).

SPLIT.npz holds x_train, x_test (N, 28, 28, 1) float32 pixels in [0, 1] and y_train, y_test
int64. The mnist5k split of modelpress (same seed, same images), written in modelpress's venv:

    python -c "import numpy as np; from modelpress.zoo.datasets import load_dataset; \\
    b = load_dataset('mnist5k', seed=0); m, s = b.meta['mean'][0], b.meta['std'][0]; \\
    f = lambda d: (np.round((d.tensors[0].numpy() * s + m) * 255).clip(0, 255).transpose(0, 2, 3, 1) \\
    / 255).astype(np.float32); np.savez_compressed('SPLIT.npz', x_train=f(b.train), \\
    y_train=b.train.tensors[1].numpy(), x_test=f(b.test), y_test=b.test.tensors[1].numpy())"

Needs TensorFlow, tf_keras and tensorflow-model-optimization (constraints-tf.txt says how to make
that venv); it does not import modelpress.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tf.keras is tf_keras (Keras 2), which TFMOT 0.8 needs
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

keras = tf.keras
SEED = 0
BATCH = 32
CALIBRATION_IMAGES = 200
PRUNE_FREQUENCY = 10  # steps between mask updates (the seed's PolynomialDecay uses 10)
KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Epochs per stage and timed interpreter calls; ``quick()`` is the smoke-run budget."""

    train: int = 15
    prune: int = 8
    prune_ramp: int = 6  # epochs over which the sparsity rises to its final value
    cluster: int = 5
    qat: int = 3
    timed_calls: int = 1000
    warmup_calls: int = 100

    @classmethod
    def quick(cls) -> Budget:
        return cls(train=1, prune=1, prune_ramp=1, cluster=1, qat=1, timed_calls=200, warmup_calls=10)


@dataclasses.dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @classmethod
    def load(cls, path: Path) -> Split:
        with np.load(path) as f:
            return cls(*(f[k] for k in ("x_train", "y_train", "x_test", "y_test")))


# -- models and training --------------------------------------------------------------------
def build_lenet5() -> keras.Model:
    """The seeds' LeNet-5 (001_fb41b931f88f06a5.txt, the Sequential listing), NHWC 28x28x1."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(6, (5, 5), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(16, (5, 5), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Flatten(),
        layers.Dense(120, activation="relu"), layers.Dropout(0.5),
        layers.Dense(84, activation="relu"), layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ], name="lenet5")


def copy_model(model: keras.Model) -> keras.Model:
    """A plain Keras model with its own layers: TFMOT's wrappers share (and train) the layers they wrap."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def fit(model: keras.Model, split: Split, epochs: int, lr: float = 1e-3, callbacks=()) -> keras.Model:
    keras.utils.set_random_seed(SEED)  # each stage reproducible on its own, whatever ran before
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(split.x_train, split.y_train, batch_size=BATCH, epochs=epochs, callbacks=list(callbacks),
              verbose=2)
    return model


def keras_accuracy(model: keras.Model, split: Split) -> float:
    probs = model.predict(split.x_test, batch_size=256, verbose=0)
    return float((probs.argmax(-1) == split.y_test).mean())


# -- the TFMOT stages: each returns (the Keras model to convert, a note) ----------------------
def stage_fp32(ctx: Pipeline) -> tuple[keras.Model, str]:
    keras.utils.set_random_seed(SEED)
    model = fit(build_lenet5(), ctx.split, ctx.budget.train)
    model.save(ctx.out / "lenet5.h5", include_optimizer=False)  # tf_keras: legacy HDF5
    return model, f"trained {ctx.budget.train} ep, Adam 1e-3, batch {BATCH}"


def prune_stage(final_sparsity: float) -> Callable[[Pipeline], tuple[keras.Model, str]]:
    def stage(ctx: Pipeline) -> tuple[keras.Model, str]:
        steps_per_epoch = -(-len(ctx.split.x_train) // BATCH)
        end_step = steps_per_epoch * ctx.budget.prune_ramp // PRUNE_FREQUENCY * PRUNE_FREQUENCY
        schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.5, final_sparsity=final_sparsity,
                                                        begin_step=0, end_step=end_step,
                                                        frequency=PRUNE_FREQUENCY)
        pruned = tfmot.sparsity.keras.prune_low_magnitude(copy_model(ctx.get("fp32")), pruning_schedule=schedule)
        fit(pruned, ctx.split, ctx.budget.prune, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
        return (tfmot.sparsity.keras.strip_pruning(pruned),
                f"poly 0.5->{final_sparsity} over {end_step} steps, {ctx.budget.prune} ep, Adam 1e-3")
    return stage


def stage_cluster(ctx: Pipeline) -> tuple[keras.Model, str]:
    clustered = tfmot.clustering.keras.cluster_weights(
        copy_model(ctx.get("prune80")), number_of_clusters=16,
        cluster_centroids_init=tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS,
        preserve_sparsity=True)
    fit(clustered, ctx.split, ctx.budget.cluster)
    return tfmot.clustering.keras.strip_clustering(clustered), f"16 clusters, {ctx.budget.cluster} ep, Adam 1e-3"


def stage_qat(ctx: Pipeline) -> tuple[keras.Model, str]:
    qat = tfmot.quantization.keras.quantize_model(copy_model(ctx.get("fp32")))
    return fit(qat, ctx.split, ctx.budget.qat), f"QAT {ctx.budget.qat} ep, Adam 1e-3"


def stage_pcqat(ctx: Pipeline) -> tuple[keras.Model, str]:
    annotated = tfmot.quantization.keras.quantize_annotate_model(copy_model(ctx.get("prune80_cluster16")))
    scheme = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True)
    pcqat = tfmot.quantization.keras.quantize_apply(annotated, scheme)
    return fit(pcqat, ctx.split, ctx.budget.qat), f"PCQAT {ctx.budget.qat} ep, Adam 1e-3"


STAGES: dict[str, Callable[[Pipeline], tuple[keras.Model, str]]] = {
    "fp32": stage_fp32, "prune80": prune_stage(0.8), "prune90": prune_stage(0.9),
    "prune80_cluster16": stage_cluster, "qat": stage_qat, "pcqat": stage_pcqat,
}

# (row name, stage, full int8?)
ROWS = [
    ("a. Keras fp32", "fp32", False),
    ("b. fp32 + PTQ int8", "fp32", True),
    ("c. prune 80% + int8", "prune80", True),
    ("d. prune 90% + int8", "prune90", True),
    ("e. prune 80% + cluster 16 + int8", "prune80_cluster16", True),
    ("f. QAT int8", "qat", True),
    ("g. prune 80% + cluster 16 + PCQAT int8", "pcqat", True),
]


class Pipeline:
    """Runs each stage once, on demand; a failed stage is remembered and fails its dependents too."""

    def __init__(self, split: Split, budget: Budget, out: Path):
        self.split, self.budget, self.out = split, budget, out
        self.done: dict[str, tuple[keras.Model, str, float] | BaseException] = {}

    def run(self, name: str) -> tuple[keras.Model, str, float]:
        """(model, note, Keras test accuracy) of stage ``name``."""
        if name not in self.done:
            print(f"== stage {name}", flush=True)
            try:
                model, note = STAGES[name](self)
                self.done[name] = (model, note, keras_accuracy(model, self.split))
            except Exception as exc:  # a TFMOT failure becomes the rows' note, the other rows still run
                traceback.print_exc()
                self.done[name] = RuntimeError(f"stage {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        result = self.done[name]
        if isinstance(result, BaseException):
            raise result
        return result

    def get(self, name: str) -> keras.Model:
        return self.run(name)[0]


# -- conversion and the interpreter ----------------------------------------------------------
def to_tflite(model: keras.Model, calibration: np.ndarray, int8: bool) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:  # full integer; input/output stay float32 so every file takes the same images
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def make_interpreter(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


def interpreter_name() -> str:
    try:
        import ai_edge_litert
        return f"ai_edge_litert {getattr(ai_edge_litert, '__version__', '')}".strip()
    except ImportError:
        return f"tf.lite.Interpreter (TF {tf.__version__})"


def predictor(interpreter) -> Callable[[np.ndarray], np.ndarray]:
    """One batch-1 call: set the (1, 28, 28, 1) float32 input, invoke, read the output."""
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]

    def predict(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)
    return predict


def litert_accuracy(predict, split: Split) -> float:
    hits = sum(int(predict(x[None]).argmax() == y) for x, y in zip(split.x_test, split.y_test))
    return hits / len(split.y_test)


def interleaved_latency_ms(predicts: list, x: np.ndarray, budget: Budget) -> list[tuple[float, float]]:
    """(median, p90) milliseconds of one batch-1 call of each predictor, timed round-robin so that
    load on the machine drifting during the run hits every file alike."""
    for _ in range(budget.warmup_calls):
        for predict in predicts:
            predict(x)
    times = np.zeros((budget.timed_calls, len(predicts)))
    for i in range(budget.timed_calls):
        for j, predict in enumerate(predicts):
            t0 = time.perf_counter()
            predict(x)
            times[i, j] = time.perf_counter() - t0
    return [(float(np.median(t) * 1e3), float(np.percentile(t, 90) * 1e3)) for t in times.T]


def kernel_stats(interpreter) -> tuple[float, list[int]]:
    """(fraction of zeros over all conv/dense kernels, unique values per kernel), read from the file."""
    kernels = [interpreter.get_tensor(op["inputs"][1]) for op in interpreter._get_ops_details()
               if op["op_name"] in KERNEL_OPS]
    zeros = sum(int((k == 0).sum()) for k in kernels)
    return zeros / max(1, sum(k.size for k in kernels)), [len(np.unique(k)) for k in kernels]


# -- rows --------------------------------------------------------------------------------------
def measure_row(name: str, stage: str, int8: bool, ctx: Pipeline, calibration: np.ndarray) -> tuple[dict, Callable]:
    """The row of one file (latency still None) and its batch-1 predictor (None when the row failed)."""
    row = {"name": name, "stage": stage, "int8": int8, "accuracy": None, "bytes": None, "gzip_bytes": None,
           "latency_ms": None, "tflite": None}
    try:
        model, note, keras_acc = ctx.run(stage)
        data = to_tflite(model, calibration, int8)
    except Exception as exc:  # the converter's failure becomes the row's note
        return {**row, "note": f"FAILED: {exc}"}, None
    path = ctx.out / f"{stage}{'_int8' if int8 else '_fp32'}.tflite"
    path.write_bytes(data)
    interpreter = make_interpreter(path)
    predict = predictor(interpreter)
    sparsity, unique = kernel_stats(interpreter)
    return {**row, "accuracy": litert_accuracy(predict, ctx.split), "keras_accuracy": keras_acc, "bytes": len(data),
            "gzip_bytes": len(gzip.compress(data, 9, mtime=0)), "kernel_sparsity": sparsity,
            "kernel_unique": unique, "note": note, "tflite": str(path)}, predict


def markdown_table(rows: list[dict]) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        return "-" if row.get(key) is None else format(row[key], fmt)

    lines = ["| row | LiteRT acc | Keras acc | .tflite B | gzip B | latency ms | kernel sparsity | unique/kernel "
             "| note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unique = "/".join(map(str, r.get("kernel_unique") or [])) or "-"
        lines.append(f"| {r['name']} | {cell(r, 'accuracy', '.2%')} | {cell(r, 'keras_accuracy', '.2%')} "
                     f"| {cell(r, 'bytes', ',')} | {cell(r, 'gzip_bytes', ',')} | {cell(r, 'latency_ms', '.4f')} "
                     f"| {cell(r, 'kernel_sparsity', '.1%')} | {unique} | {r['note']} |")
    return "\n".join(lines)


# -- Keras 3 reading the legacy .h5 ------------------------------------------------------------
KERAS3_CHECK = """
import json, sys, keras, numpy as np
d = np.load(sys.argv[2])
m = keras.saving.load_model(sys.argv[1], compile=False)
m.summary(print_fn=lambda s, **k: print(s, file=sys.stderr))
out = keras.ops.convert_to_numpy(m(d["x"], training=False))
print(json.dumps({"keras": keras.__version__, "backend": keras.backend.backend(),
                  "max_abs_diff": float(np.abs(out - d["ref"]).max()),
                  "same_top1": bool((out.argmax(-1) == d["ref"].argmax(-1)).all())}))
"""


def check_keras3(python: str, h5: Path, model: keras.Model, x: np.ndarray, out: Path) -> dict:
    """Load ``h5`` in Keras 3 (torch backend) with ``python``; compare with tf_keras's outputs on ``x``."""
    probe = out / "keras3_probe.npz"
    np.savez(probe, x=x, ref=model.predict(x, verbose=0))
    proc = subprocess.run([python, "-c", KERAS3_CHECK, str(h5), str(probe)], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "torch"}, timeout=600)
    probe.unlink()
    if proc.returncode:
        result = {"loaded": False, "error": proc.stderr.strip().splitlines()[-1:]}
    else:
        result = {"loaded": True, **json.loads(proc.stdout.strip().splitlines()[-1]), "summary": proc.stderr}
    (out / "keras3_check.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="SPLIT.npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("--out", type=Path, required=True, help="folder for lenet5.h5, the .tflite files, json")
    parser.add_argument("--quick", action="store_true", help="1 epoch per stage: a smoke run")
    parser.add_argument("--keras3-python", help="a Python with Keras 3 + torch: check it reads lenet5.h5")
    args = parser.parse_args()
    t0 = time.perf_counter()
    tf.config.experimental.enable_op_determinism()
    args.out.mkdir(parents=True, exist_ok=True)
    split = Split.load(args.data)
    ctx = Pipeline(split, Budget.quick() if args.quick else Budget(), args.out)
    calibration = split.x_train[np.random.default_rng(SEED).permutation(len(split.x_train))[:CALIBRATION_IMAGES]]
    rows, predicts = zip(*(measure_row(name, stage, int8, ctx, calibration) for name, stage, int8 in ROWS))
    timed = [(row, p) for row, p in zip(rows, predicts) if p is not None]
    for (row, _), (median, p90) in zip(timed, interleaved_latency_ms([p for _, p in timed], split.x_test[:1],
                                                                      ctx.budget)):
        row.update(latency_ms=median, latency_p90_ms=p90)
    rows = list(rows)
    (args.out / "tfmot_rows.json").write_text(json.dumps(rows, indent=2))
    print(f"\nTF {tf.__version__}, tf_keras {tf_keras.__version__}, TFMOT {tfmot.__version__}, "
          f"interpreter: {interpreter_name()}; {len(split.y_train)} train / {len(split.y_test)} test images")
    print(markdown_table(rows))
    if args.keras3_python and isinstance(ctx.done.get("fp32"), tuple):
        check = check_keras3(args.keras3_python, args.out / "lenet5.h5", ctx.get("fp32"), split.x_test[:8], args.out)
        print("Keras 3 reads lenet5.h5:", {k: v for k, v in check.items() if k != "summary"})
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
