"""Keras models in: keras.applications architectures converted to PyTorch (issue 17).

Each model is built with ``weights=None`` (random weights; BatchNorm statistics randomised too, so
wrong statistics would show), saved as ``.keras``, read back with ``modelpress.load_model`` and run
on the same random float32 NHWC batch as Keras. Columns: parameters, seconds to read and convert
the file, max abs difference of the outputs (softmax probabilities of the 10-class head; and of the
pre-softmax features for the classifier-free variant), and channel pruning (ratio 0.5) on the
converted model: MACs kept; then Keras out: the pruned model written back as a ``.keras`` file
(``export_keras``), its parameters as Keras counts them, its bytes next to the original file's,
and the max abs difference of Keras's outputs from the pruned PyTorch model's on the same batch.
Run (CPU, 1 thread; needs the ``[keras]`` extra):

    python benchmarks/keras_convert.py            # MobileNetV2, ResNet50, EfficientNetB0 at 96x96
    python benchmarks/keras_convert.py --size 64 --models MobileNetV2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import modelpress  # noqa: E402
from modelpress.export.keras import export_keras  # noqa: E402
from modelpress.nn.macs import count_macs  # noqa: E402
from modelpress.pruning.structured import ChannelPruning  # noqa: E402

MODELS = ("MobileNetV2", "ResNet50", "EfficientNetB0")


def randomize_batchnorm(model, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if i in (0, 3) else
                               rng.normal(0, 0.3, w.shape).astype("float32")
                               for i, w in enumerate(layer.get_weights())])


def row(name: str, size: int, folder: Path, prune: bool) -> dict:
    model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=10,
                                              classifier_activation=None)
    randomize_batchnorm(model)
    path = folder / f"{name}.keras"
    model.save(path)
    t0 = time.perf_counter()
    module = modelpress.load_model(path)
    seconds = time.perf_counter() - t0
    x = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype("float32")
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    out = {"model": name, "params": sum(p.numel() for p in module.parameters()), "convert_s": seconds,
           "max_abs_diff": float(np.abs(ref - got).max()), "max_abs_ref": float(np.abs(ref).max()),
           "kind": type(module).__name__}
    if prune:
        shape = [1, size, size, 3]
        macs = count_macs(module, torch.randn(*shape)).total
        small = modelpress.prune(module, ChannelPruning(ratio=0.5, input_shape=shape))
        out["macs_kept"] = count_macs(small, torch.randn(*shape)).total / macs
        done = export_keras(small, folder / f"{name}-pruned.keras", example_inputs=torch.from_numpy(x))
        back = keras.saving.load_model(done.path, compile=False)
        with torch.no_grad():
            ref = small(torch.from_numpy(x)).numpy()
        out.update(keras_params=back.count_params(), keras_bytes=done.bytes, source_bytes=path.stat().st_size,
                   back_diff=float(np.abs(keras.ops.convert_to_numpy(back(x, training=False)) - ref).max()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--no-prune", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"keras {keras.__version__} (backend {keras.backend.backend()}), torch {torch.__version__}, "
          f"input {args.size}x{args.size}x3, batch 4, logits of a 10-class head")
    print(f"{'model':<16}{'module':<18}{'params':>12}{'convert s':>11}{'max |diff|':>12}{'max |ref|':>11}"
          f"{'MACs kept (prune 0.5)':>23}{'.keras params':>15}{'.keras bytes (was)':>26}{'back |diff|':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            r = row(name, args.size, Path(tmp), not args.no_prune)
            kept = f"{r['macs_kept']:.2f}" if "macs_kept" in r else "-"
            sizes = f"{r['keras_bytes']:,} ({r['source_bytes']:,})" if "keras_params" in r else ""
            back = (f"{r['keras_params']:>15,}{sizes:>26}{r['back_diff']:>13.2e}" if "keras_params" in r else "")
            print(f"{r['model']:<16}{r['kind']:<18}{r['params']:>12,}{r['convert_s']:>11.2f}"
                  f"{r['max_abs_diff']:>12.2e}{r['max_abs_ref']:>11.3g}{kept:>23}{back}", flush=True)


if __name__ == "__main__":
    main()
