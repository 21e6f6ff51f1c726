"""Peer benchmark (issue 6): modelpress against other compression toolkits, same baselines, one table.

Every row of a task starts from the same baseline and is measured in the same process, the
same way: quality on held-out data, the bytes of the file the toolkit itself saves, MACs per
sample, and latency as a ratio to the fp32 model **in the same runtime**, timed alternating
call by call with it (``compare_latency``, median ratio) at 1 and 2 threads (torch threads or
ONNX Runtime intra-op threads; ORT sessions as in ``ort_session(spinning=False)``, ORT_ENABLE_ALL).

1. LeNet-5 on mnist5k (``get_baseline`` with the recipe's baseline settings; batch 64):
   * modelpress: the built-in recipe ``lenet5-deep-compression`` run through ``run_recipe``
     exactly as ``modelpress compress -r lenet5-deep-compression`` does (whatever the recipe is
     at run time); size = the run's ``model.safetensors``;
   * ``torch.nn.utils.prune.global_unstructured`` (L1) at the recipe's sparsity on the same
     layers, then a plain Adam + cosine loop for the recipe's total fine-tune epochs (summed
     over its stages) at its learning rate; ``prune.remove`` then ``torch.save(state_dict)``;
   * NNCF ``nncf.quantize`` (defaults; 512 training images as single-image items, NNCF takes
     its default subset of 300), ``nncf.strip`` and ONNX export, run by ONNX Runtime (the file
     keeps fp32 weights behind QuantizeLinear/DequantizeLinear: ``strip_format=DQ``, which would
     store int8, refuses NNCF's default quantizers, and OpenVINO, NNCF's own runtime, is not
     installed);
   * torchao ``quantize_(model, Int8WeightOnlyConfig())`` (default filter: nn.Linear only),
     eager PyTorch, ``torch.save(state_dict)``;
   * ONNX Runtime ``quant_pre_process`` then ``quantize_static`` (defaults: QDQ, int8/int8,
     per-tensor, MinMax; the same 512 images in batches of 64) and ``quantize_dynamic`` (defaults).
   Target: modelpress >= 50x smaller than the fp32 artifact (``save_artifact``), drop <= 0.5 pt.
2. MiniLM (all-MiniLM-L6-v2, bundled): batch = the first 32 graded-pair sentences padded to the
   longest; quality = Spearman on the bundled graded pairs and fidelity (mean cosine to fp32):
   * fp32 eager and fp32 ONNX (``export_onnx``), the two references;
   * ONNX Runtime ``quantize_dynamic`` with the settings ``quant_dynamic.py`` found fastest
     (QInt8, per_channel, reduce_range);
   * ``torch.ao.quantization.quantize_dynamic`` ({nn.Linear}, qint8), torchao
     ``Int8DynamicActivationInt8WeightConfig`` (eager), NNCF ``nncf.quantize`` with
     ``model_type=TRANSFORMER`` (300 sentences of the bundled corpus, never the graded pairs)
     exported to ONNX;
   * modelpress: ``compressed_minilm(quick, workdir)`` from ``benchmarks/minilm_small.py``, an
     ONNX file measured like the others, and timed directly against the ORT int8 file; its MACs
     are counted on the ONNX graph (MatMul / Gemm / Conv, shapes from one ORT run) unless the
     function returns ``"macs"``.
   Target: modelpress >= 1.5x faster than ORT dynamic int8 at batch 32 (1 and 2 threads),
   Spearman within 0.01 of fp32, file <= 15,000,000 bytes.
3. resnet_small on mnist5k: modelpress ``prune.channels`` (Taylor, ``round_to=8``,
   ``target_macs_reduction=0.5``) vs Torch-Pruning ``MetaPruner`` (Taylor and L1, ``round_to=8``,
   uniform ratio bisected to the same MACs), each + the same 3-epoch fine-tune (as
   ``pruning_structured.py``); NNCF PTQ and ORT ``quantize_static`` (defaults) for context.
   Target: modelpress accuracy >= the best Torch-Pruning row, speed-up >= 1.7x at 1 and 2 threads.
4. The seeds' Keras LeNet-5 to LiteRT (``benchmarks/keras_lenet5.py``, which this task calls): TF
   Model Optimization's rows (PTQ, pruning 80% / 90%, clustering, QAT, PCQAT; each an int8
   ``.tflite``, trained in the TensorFlow venv of ``constraints-tf.txt`` by
   ``keras_lenet5_tfmot.py``: ``--tf-python`` runs it, ``--tfmot-dir`` reuses a run) and modelpress on
   the same ``lenet5.h5``; quality = LiteRT accuracy on the 1,000 test images, size = the
   ``.tflite`` bytes (gzip bytes in the notes: how TFMOT reports size), latency = LiteRT
   interpreter at batch 1 against TFMOT's fp32 ``.tflite``. Needs the [tflite] and [keras] extras.
   Target (issue 17): modelpress <= 5,400 B gzipped within 0.5 pt of the Keras fp32 model.

A peer that is missing or fails still gets its row, with the reason. NNCF builds a small C++
extension on first use (cached in ~/.cache/torch_extensions; this script lifts NNCF's 60 s
load timeout for that build).

    python benchmarks/peers.py                  # tasks 1,2,3
    python benchmarks/peers.py --tasks 4 --tfmot-dir /work/tfmot-run    # the seeds' LeNet-5 in LiteRT
    python benchmarks/peers.py --tasks 1,3      # a subset
    python benchmarks/peers.py --quick          # smoke run: 20 fine-tune steps, few timings
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # first use compiles for minutes on 2 cores
os.environ.setdefault("KERAS_BACKEND", "torch")  # task 4 reads the Keras file without TensorFlow
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pruning_structured as structured  # noqa: E402
import quant_dynamic  # noqa: E402

from modelpress import TrainConfig, prune  # noqa: E402
from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.core.training import evaluate_accuracy  # noqa: E402
from modelpress.export.onnx import export_onnx, onnx_inputs, ort_feeds, ort_session  # noqa: E402
from modelpress.nn.macs import count_macs  # noqa: E402
from modelpress.zoo.baselines import get_baseline  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402

RECIPE = "lenet5-deep-compression"
CALIB_IMAGES, BATCH = 512, 64
T1_RATIO, T1_DROP = 50.0, 0.5
T2_SPEEDUP, T2_SPEARMAN_TOL, T2_BYTES = 1.5, 0.01, 15_000_000
T3_SPEEDUP = 1.7
T4_GZIP, T4_DROP = 5_400, 0.5
INSTALL_HINT = "pip install -c constraints.txt -e '.[peers]'"


# -- measuring ------------------------------------------------------------------------------
class OrtModel(nn.Module):
    """An ONNX file behind a module call, so accuracy, ``embedding_quality`` and ``compare_latency``
    treat it like an eager model. Idle ORT threads do not spin (they would take the cores from
    the call timed next)."""

    def __init__(self, path, threads: int | None = 1, tokenizer=None):
        super().__init__()
        self.session = ort_session(path, threads=threads, spinning=False)
        self.tokenizer = tokenizer

    def forward(self, *args, **kwargs):
        inputs = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        return torch.from_numpy(self.session.run(None, ort_feeds(self.session, inputs))[0])


def timing(quick: bool, heavy: bool = False) -> tuple[int, int, float]:
    """(warmup, repeats, min seconds) per comparison; ``heavy``: MiniLM-sized calls."""
    if heavy:
        return (1, 3, 0.0) if quick else (3, 15, 1.5)
    return (2, 5, 0.0) if quick else (5, 60, 3.0)  # as pruning_structured.py


def latency(ref, cand, x, t: tuple[int, int, float]) -> dict:
    """{threads: (ref ms, cand ms, ref / cand)}; an ``.onnx`` path runs in ONNX Runtime."""
    out = {}
    for threads in (1, 2):
        a, b = (OrtModel(m, threads) if isinstance(m, Path) else m for m in (ref, cand))
        c = compare_latency(a, b, x, threads=threads, warmup=t[0], repeats=t[1], min_time_s=t[2])
        out[threads] = (c.a.median_ms, c.b.median_ms, c.ratio)
    return out


def ort_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((OrtModel(path, threads=None)(x).argmax(1) == y).float().mean())


def saved_bytes(obj, path: Path) -> int:
    torch.save(obj, path)
    return path.stat().st_size


def macs_cell(model: nn.Module, x1) -> str:
    rep = count_macs(model, x1)
    return f"{rep.total:,}" + (f" ({rep.effective_total:,} non-zero)" if rep.effective_total < rep.total else "")


_MATMULS = ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat", "Gemm")
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_UNCOUNTED = ("Attention", "QAttention", "MultiHeadAttention", "GroupQueryAttention", "Einsum", "ConvTranspose")


def onnx_macs(path: Path, inputs) -> tuple[int, list[str]]:
    """MACs of one call of an ONNX file on ``inputs`` (MatMul / Gemm / Conv families; shapes read by
    running it once in ONNX Runtime), and the MAC-carrying op types it does not count."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: list(i.dims) for i in g.initializer}
    graph_inputs = {i.name for i in g.input}
    feeds = {k: v for k, v in onnx_inputs(inputs).items() if k in graph_inputs}
    nodes = [n for n in g.node if n.op_type in _MATMULS or n.op_type in _CONV_WEIGHT]
    wanted = {n.output[0] for n in nodes} | {n.input[0] for n in nodes}
    wanted |= {n.input[_CONV_WEIGHT[n.op_type]] for n in nodes if n.op_type in _CONV_WEIGHT}
    wanted -= set(inits) | set(feeds) | {o.name for o in g.output}
    g.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(wanted))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: list(a.shape) for n, a in zip(names, sess.run(names, feeds))}
    shapes.update(inits)
    shapes.update({k: list(v.shape) for k, v in feeds.items()})
    total = 0
    for n in nodes:
        out = math.prod(shapes[n.output[0]])
        if n.op_type in _CONV_WEIGHT:
            k = math.prod(shapes[n.input[_CONV_WEIGHT[n.op_type]]][1:])
        elif n.op_type == "Gemm":
            trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
            k = shapes[n.input[0]][0 if trans_a else 1]
        else:
            k = shapes[n.input[0]][-1]
        total += out * k
    return total, sorted({n.op_type for n in g.node if n.op_type in _UNCOUNTED})


# -- rows -----------------------------------------------------------------------------------
class PeerMissing(Exception):
    """A peer toolkit is not installed: its row is printed with this reason."""


def need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerMissing(f"{module} not installed ({INSTALL_HINT}): {exc}") from None


def make_row(task: int, name: str, runtime: str, quality: str = "-", *, size: int | None = None,
             size_of: str = "", macs: str = "-", lat: dict | None = None, note: str = "", **extra) -> dict:
    return {"task": task, "row": name, "runtime": runtime, "quality": quality, "bytes": size, "size_of": size_of,
            "macs": macs, "lat": lat, "note": note, "target": None, **extra}


def guarded(task: int, name: str, runtime: str, fn) -> list[dict]:
    """``fn()``'s rows, or one row saying why the peer did not run (never hidden)."""
    t0 = time.perf_counter()
    try:
        return fn()
    except PeerMissing as exc:
        return [make_row(task, name, runtime, "not run", note=str(exc), failed=True)]
    except Exception as exc:  # noqa: BLE001 - a peer failing is a result to print
        traceback.print_exc(file=sys.stderr)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return [make_row(task, name, runtime, "failed", failed=True,
                         note=f"{type(exc).__name__}: {first} (after {time.perf_counter() - t0:.0f} s)")]


@contextlib.contextmanager
def quiet():
    """Silence peers' progress bars and notices (stdout, root logging) for one call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def ort_static(fp32: Path, dest: Path, calib: list[np.ndarray]) -> Path:
    """ONNX Runtime's recommended flow with its default settings: pre-process, then quantize_static."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": b} for b in calib)

        def get_next(self):
            return next(self.it, None)

    pre = dest.with_suffix(".pre.onnx")
    with quiet():
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(dest), Reader())
    return dest


def ort_dynamic(fp32: Path, dest: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dest.with_suffix(".pre.onnx")
    with quiet():
        quant_pre_process(str(fp32), str(pre))
        quantize_dynamic(str(pre), str(dest))
    return dest


def nncf_ptq(base: nn.Module, items: list, example, dest: Path, **kwargs) -> tuple[nn.Module, Path, float]:
    """NNCF's PyTorch PTQ with its defaults (plus ``kwargs``), stripped and exported to ONNX."""
    nncf = need("nncf")
    nncf.set_log_level(logging.ERROR)  # its logger writes progress notices to stdout, into the table
    t = time.perf_counter()
    with quiet():
        q = nncf.quantize(copy.deepcopy(base).eval(), nncf.Dataset(items), **kwargs)
        stripped = nncf.strip(q, do_copy=True, example_input=example)
        export_onnx(stripped, example, dest)
    return q.eval(), dest, time.perf_counter() - t


def cnn_setup(model_name: str, bundle, base: nn.Module, d: Path, quick: bool) -> dict:
    """What every CNN row shares: inputs, references (fp32 eager and fp32 ONNX) and calibration."""
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    y = torch.tensor([int(bundle.test[i][1]) for i in range(len(bundle.test))])
    calib = [torch.stack([bundle.train[i][0] for i in range(j, j + BATCH)]) for j in range(0, CALIB_IMAGES, BATCH)]
    fp32_onnx = export_onnx(base, x[:BATCH], d / f"{model_name}-fp32.onnx")
    return {"x": x, "y": y, "x64": x[:BATCH], "x1": x[:1], "calib": calib, "fp32_onnx": fp32_onnx,
            "acc0": evaluate_accuracy(base, bundle.test), "acc0_ort": ort_accuracy(fp32_onnx, x, y),
            "fp32_bytes": save_artifact(base, d / f"{model_name}-fp32.safetensors").stat().st_size,
            "t": timing(quick)}


def reference_rows(task: int, name: str, base: nn.Module, s: dict) -> list[dict]:
    return [make_row(task, f"{name} fp32", "PyTorch eager", f"acc {s['acc0']:.2%}", size=s["fp32_bytes"],
                     size_of="modelpress artifact (.safetensors)", macs=macs_cell(base, s["x1"]), reference="eager",
                     acc=s["acc0"]),
            make_row(task, f"{name} fp32", "ONNX Runtime", f"acc {s['acc0_ort']:.2%}",
                     size=s["fp32_onnx"].stat().st_size, size_of=".onnx", macs=macs_cell(base, s["x1"]),
                     reference="ort", acc=s["acc0_ort"])]


def acc_row(task, name, runtime, acc, acc0, **kw) -> dict:
    return make_row(task, name, runtime, f"acc {acc:.2%} ({(acc - acc0) * 100:+.2f} pt)", acc=acc,
                    drop=(acc0 - acc) * 100, **kw)


def cnn_ptq_peers(task: int, base: nn.Module, s: dict, d: Path, tag: str) -> list[dict]:
    """NNCF PTQ int8 and ORT quantize_static (defaults), both deployed to ONNX Runtime."""
    macs = macs_cell(base, s["x1"])

    def nncf_row():
        singles = [img.unsqueeze(0) for c in s["calib"] for img in c]
        q, path, secs = nncf_ptq(base, singles, s["x64"], d / f"{tag}-nncf.onnx")
        with torch.no_grad():
            fq = float((q(s["x"]).argmax(1) == s["y"]).float().mean())
        return [acc_row(task, "NNCF 3 PTQ int8 (nncf.quantize defaults) -> ONNX", "ONNX Runtime",
                        ort_accuracy(path, s["x"], s["y"]), s["acc0_ort"], size=path.stat().st_size,
                        size_of=".onnx (QDQ, weights kept fp32)", macs=macs,
                        lat=latency(s["fp32_onnx"], path, s["x64"], s["t"]),
                        note=f"300 of 512 train images, nncf.strip + ONNX export; NNCF fake-quant in PyTorch "
                             f"{fq:.2%}; {secs:.1f}s")]

    def ort_row():
        t = time.perf_counter()
        path = ort_static(s["fp32_onnx"], d / f"{tag}-ort-static.onnx", [c.numpy() for c in s["calib"]])
        return [acc_row(task, "ORT quantize_static (defaults)", "ONNX Runtime", ort_accuracy(path, s["x"], s["y"]),
                        s["acc0_ort"], size=path.stat().st_size, size_of=".onnx", macs=macs,
                        lat=latency(s["fp32_onnx"], path, s["x64"], s["t"]),
                        note=f"quant_pre_process, then QDQ s8s8 per-tensor MinMax on 512 train images; "
                             f"{time.perf_counter() - t:.1f}s")]

    return (guarded(task, "NNCF PTQ int8", "ONNX Runtime", nncf_row)
            + guarded(task, "ORT quantize_static", "ONNX Runtime", ort_row))


# -- task 1: LeNet-5, Deep Compression ------------------------------------------------------
def recipe_settings(recipe) -> tuple:
    """(unstructured pruning config or None, total fine-tune epochs, the first fine-tune's TrainConfig)."""
    from modelpress.pruning.magnitude import UnstructuredPruning

    cfg = next((c for c in recipe.method_configs() if isinstance(c, UnstructuredPruning)), None)
    tunes = [st.finetune for st in recipe.stages if st.finetune is not None]
    epochs = sum(t.epochs for t in tunes)
    return cfg, epochs, (tunes[0] if tunes else TrainConfig())


def torch_prune_global_l1(base: nn.Module, layer_names: list[str], sparsity: float, train_set, cfg: TrainConfig,
                          epochs: float, seed: int = 0) -> nn.Module:
    """PyTorch's own global L1 pruning, then a plain loop: Adam, cosine, ``epochs`` passes (masks kept)."""
    from torch.nn.utils import prune as torch_prune
    from torch.utils.data import DataLoader

    model = copy.deepcopy(base)
    params = [(model.get_submodule(n), "weight") for n in layer_names]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    torch.manual_seed(seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    steps = int(round(len(loader) * epochs))
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    for module, name in params:
        torch_prune.remove(module, name)
    return model.eval()


def lenet_rows(quick: bool, d: Path) -> list[dict]:
    from modelpress.recipes.pipeline import run_recipe
    from modelpress.recipes.schema import Recipe

    recipe = Recipe.load(RECIPE)
    if quick:  # 20 steps per fine-tune, no latency / ONNX measurement inside the run
        over = [f"stage.{i + 1}.finetune.max_steps=20" for i, st in enumerate(recipe.stages) if st.finetune]
        recipe = Recipe.load(RECIPE, over + ["eval.latency=false", "eval.onnx=false"])
    bundle = load_dataset(recipe.data, seed=recipe.seed)
    base, _ = get_baseline(recipe.model, bundle, seed=recipe.seed, train=recipe.baseline.train)
    base.eval()
    s = cnn_setup("lenet5", bundle, base, d, quick)
    rows = reference_rows(1, "LeNet-5", base, s)

    def modelpress_row():
        t = time.perf_counter()
        result = run_recipe(recipe, copy.deepcopy(base), bundle, out=d / "recipe", resume=False)
        secs = time.perf_counter() - t
        final = result.out / "model.safetensors"
        model = result.model.eval()
        acc = evaluate_accuracy(model, bundle.test)
        stages = " -> ".join(f"{st.method}" for st in recipe.stages)
        r = acc_row(1, f"modelpress recipe {RECIPE}", "PyTorch eager", acc, s["acc0"], size=final.stat().st_size,
                    size_of="modelpress artifact (.safetensors)", macs=macs_cell(model, s["x1"]),
                    lat=latency(base, model, s["x64"], s["t"]),
                    note=f"run_recipe as `modelpress compress -r {RECIPE}`: {stages}; last stage artifact "
                         f"{result.final.get('artifact_bytes', 0):,} B, model.safetensors adds the run's metadata; "
                         f"{secs:.0f}s")
        r["x_smaller"] = s["fp32_bytes"] / r["bytes"]
        r["target"] = r["x_smaller"] >= T1_RATIO and round(r["drop"], 2) <= T1_DROP  # 1,000 images: 0.1 pt steps
        return [r]

    def torch_prune_row():
        from modelpress.pruning.magnitude import select_layers

        cfg, epochs, tune = recipe_settings(recipe)
        if cfg is None:
            raise RuntimeError(f"recipe {RECIPE} has no unstructured pruning stage to match")
        names = [n for n, _ in select_layers(base, cfg)]
        if quick:
            tune = tune.model_copy(update={"max_steps": 20})
        t = time.perf_counter()
        model = torch_prune_global_l1(base, names, cfg.sparsity, bundle.train, tune, epochs)
        secs = time.perf_counter() - t
        acc = evaluate_accuracy(model, bundle.test)
        size = saved_bytes(model.state_dict(), d / "lenet5-torch-prune.pt")
        as_artifact = save_artifact(model, d / "lenet5-torch-prune.safetensors").stat().st_size
        return [acc_row(1, f"torch.nn.utils.prune global L1 {cfg.sparsity:.0%} + same ft", "PyTorch eager", acc,
                        s["acc0"], size=size, size_of="torch.save(state_dict) (dense)",
                        macs=macs_cell(model, s["x1"]), lat=latency(base, model, s["x64"], s["t"]),
                        note=f"layers {', '.join(names)} (the recipe's); Adam lr {tune.lr:g} cosine, {epochs:g} "
                             f"epochs = the recipe's total fine-tune{' (20 steps: quick)' if quick else ''}; "
                             f"as modelpress artifact {as_artifact:,} B; {secs:.0f}s")]

    def torchao_row():
        need("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = copy.deepcopy(base)
        t = time.perf_counter()
        with quiet():
            quantize_(model, Int8WeightOnlyConfig())
        secs = time.perf_counter() - t
        acc = evaluate_accuracy(model, bundle.test)
        return [acc_row(1, "torchao quantize_ Int8WeightOnlyConfig", "PyTorch eager", acc, s["acc0"],
                        size=saved_bytes(model.state_dict(), d / "lenet5-torchao.pt"),
                        size_of="torch.save(state_dict)", macs=macs_cell(base, s["x1"]),
                        lat=latency(base, model, s["x64"], s["t"]),
                        note=f"default filter quantizes nn.Linear only (fc1-fc3), convs stay fp32; {secs:.2f}s")]

    def ort_dynamic_row():
        path = ort_dynamic(s["fp32_onnx"], d / "lenet5-ort-dynamic.onnx")
        return [acc_row(1, "ORT quantize_dynamic (defaults)", "ONNX Runtime", ort_accuracy(path, s["x"], s["y"]),
                        s["acc0_ort"], size=path.stat().st_size, size_of=".onnx", macs=macs_cell(base, s["x1"]),
                        lat=latency(s["fp32_onnx"], path, s["x64"], s["t"]),
                        note="quant_pre_process, then int8 weights, activations quantized per call")]

    rows += guarded(1, f"modelpress recipe {RECIPE}", "PyTorch eager", modelpress_row)
    rows += guarded(1, "torch.nn.utils.prune global L1", "PyTorch eager", torch_prune_row)
    rows += cnn_ptq_peers(1, base, s, d, "lenet5")
    rows += guarded(1, "torchao int8 weight-only", "PyTorch eager", torchao_row)
    rows += guarded(1, "ORT quantize_dynamic", "ONNX Runtime", ort_dynamic_row)
    for r in rows:
        if r.get("bytes"):
            r.setdefault("x_smaller", s["fp32_bytes"] / r["bytes"])
    return rows


# -- task 2: MiniLM -------------------------------------------------------------------------
def minilm_rows(quick: bool, d: Path) -> list[dict]:
    from modelpress.tasks.embedding import embed_sentences, embedding_quality, pair_sentences, tokenize
    from modelpress.zoo.corpora import load_sentences, load_sts_pairs
    from modelpress.zoo.models import build_model

    dense = build_model("minilm").eval()
    tok = dense.tokenizer
    pairs = load_sts_pairs()
    sentences = pair_sentences(pairs)
    x32 = tokenize(tok, sentences[:32])
    x1 = {k: v[:1] for k, v in x32.items()}
    q0 = embedding_quality(dense, pairs)
    ref_emb = embed_sentences(dense, tok, sentences)
    t = timing(quick, heavy=True)
    fp32_bytes = save_artifact(dense, d / "minilm-fp32.safetensors").stat().st_size
    fp32_onnx = export_onnx(dense, x32, d / "minilm-fp32.onnx")
    dense_macs = f"{count_macs(dense, x1).total:,}"
    seq = f"batch 32 x {x32['input_ids'].shape[1]} tokens"

    def quality(model, tokenizer=tok) -> dict:
        q = embedding_quality(model, pairs, reference=ref_emb, tokenizer=tokenizer)
        return {"quality": f"spearman {q['spearman']:.4f}, fidelity {q['fidelity']:.4f}", "spearman": q["spearman"],
                "fidelity": q["fidelity"]}

    def emb_row(name, runtime, model, **kw):
        qd = quality(model)
        return make_row(2, name, runtime, qd.pop("quality"), **qd, **kw)

    rows = [make_row(2, "MiniLM-L6 fp32", "PyTorch eager", f"spearman {q0['spearman']:.4f}", size=fp32_bytes,
                     size_of="modelpress artifact (.safetensors)", macs=dense_macs, reference="eager",
                     spearman=q0["spearman"], note=seq),
            emb_row("MiniLM-L6 fp32", "ONNX Runtime", OrtModel(fp32_onnx, tokenizer=tok),
                    size=fp32_onnx.stat().st_size, size_of=".onnx", macs=dense_macs, reference="ort",
                    note="export_onnx (TorchScript, opset 17)")]
    ort_int8 = {}

    def ort_dynamic_row():
        path = quant_dynamic.ort_quantized(fp32_onnx, d / "minilm-ort-int8.onnx", "QInt8", True, True)
        ort_int8["path"] = path
        return [emb_row("ORT quantize_dynamic int8", "ONNX Runtime", OrtModel(path, tokenizer=tok),
                        size=path.stat().st_size, size_of=".onnx", macs=dense_macs,
                        lat=latency(fp32_onnx, path, x32, t),
                        note="weight_type=QInt8, per_channel, reduce_range (fastest meeting quality in "
                             "quant_dynamic.py)")]

    def torch_ao_row():
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {nn.Linear}, dtype=torch.qint8).eval()
        return [emb_row("torch.ao quantize_dynamic (qint8 Linear)", "PyTorch eager", model,
                        size=saved_bytes(model.state_dict(), d / "minilm-torch-ao.pt"),
                        size_of="torch.save(state_dict)", macs=dense_macs, lat=latency(dense, model, x32, t),
                        note="defaults: per-tensor weights, reduce_range on x86")]

    def torchao_row():
        need("torchao")
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = copy.deepcopy(dense)
        with quiet():
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
        slow = (1, 1, 0.0) if quick else (1, 3, 0.0)  # ~20x slower than fp32 eager on this CPU
        return [emb_row("torchao quantize_ Int8DynamicActivationInt8WeightConfig", "PyTorch eager", model,
                        size=saved_bytes(model.state_dict(), d / "minilm-torchao.pt"),
                        size_of="torch.save(state_dict)", macs=dense_macs, lat=latency(dense, model, x32, slow),
                        note="eager: torch.compile (torchao's route to speed) not timed, its first compile "
                             "alone took 103 s on this 2-core machine; embeddings stay fp32")]

    def nncf_row():
        nncf = need("nncf")
        corpus = load_sentences(32 if quick else 300)
        items = [tokenize(tok, [sent]) for sent in corpus]
        q, path, secs = nncf_ptq(dense, items, x32, d / "minilm-nncf.onnx", model_type=nncf.ModelType.TRANSFORMER,
                                 **({"subset_size": 32} if quick else {}))
        return [emb_row("NNCF 3 PTQ int8 (model_type=TRANSFORMER) -> ONNX", "ONNX Runtime",
                        OrtModel(path, tokenizer=tok), size=path.stat().st_size,
                        size_of=".onnx (QDQ, weights kept fp32)", macs=dense_macs, lat=latency(fp32_onnx, path, x32, t),
                        note=f"{len(items)} corpus sentences one per item, nncf.strip + ONNX export; {secs:.0f}s")]

    def modelpress_row():
        try:
            from minilm_small import compressed_minilm
        except ImportError as exc:
            raise PeerMissing(f"benchmarks/minilm_small.py not importable yet ({exc})") from None
        start = time.perf_counter()
        res = compressed_minilm(quick, d / "minilm_small")
        secs = time.perf_counter() - start
        path = Path(res["onnx"])
        if "macs" in res:
            macs = f"{int(res['macs']):,}"
        else:
            total, missed = onnx_macs(path, x1)
            macs = f"{total:,}" + (f" (+ uncounted {', '.join(missed)})" if missed else "")
        name = res["name"] if res["name"].startswith("modelpress") else f"modelpress {res['name']}"
        r = emb_row(name, "ONNX Runtime", OrtModel(path, tokenizer=tok),
                    size=path.stat().st_size, size_of=".onnx", macs=macs, lat=latency(fp32_onnx, path, x32, t))
        if "path" in ort_int8:
            r["vs_ort_int8"] = {k: v[2] for k, v in latency(ort_int8["path"], path, x32, t).items()}
        vs = r.get("vs_ort_int8")
        vs_s = (f"vs ORT int8: {vs[1]:.2f}x (1 thr), {vs[2]:.2f}x (2 thr)" if vs else "no ORT int8 row to time against")
        r["note"] = f"{res.get('notes', '')}; {vs_s}; built in {secs:.0f}s".lstrip("; ")
        r["target"] = (vs is not None and min(vs.values()) >= T2_SPEEDUP
                       and r["spearman"] >= q0["spearman"] - T2_SPEARMAN_TOL and r["bytes"] <= T2_BYTES)
        r["spearman0"] = q0["spearman"]
        return [r]

    rows += guarded(2, "ORT quantize_dynamic int8", "ONNX Runtime", ort_dynamic_row)
    rows += guarded(2, "modelpress compressed MiniLM", "ONNX Runtime", modelpress_row)
    rows += guarded(2, "torch.ao quantize_dynamic", "PyTorch eager", torch_ao_row)
    rows += guarded(2, "torchao int8 dynamic", "PyTorch eager", torchao_row)
    rows += guarded(2, "NNCF PTQ int8", "ONNX Runtime", nncf_row)
    for r in rows:
        if r.get("bytes"):
            r["x_smaller"] = fp32_bytes / r["bytes"]
    return rows


# -- task 3: resnet_small, channel pruning ---------------------------------------------------
def conv_shapes(model: nn.Module) -> list[tuple]:
    """Every conv weight's shape: equal lists mean the same compute, so latency gaps are noise."""
    return [tuple(p.shape) for p in model.parameters() if p.dim() == 4]


def resnet_rows(quick: bool, d: Path) -> list[dict]:
    from modelpress.pruning.structured import ChannelPruning

    bundle = load_dataset("mnist5k")
    base, _ = get_baseline("resnet_small", bundle)
    base.eval()
    s = cnn_setup("resnet_small", bundle, base, d, quick)
    rows = reference_rows(3, "resnet_small", base, s)
    ft = TrainConfig(epochs=3, lr=1e-3, max_steps=20 if quick else None)
    calib = [tuple(torch.utils.data.default_collate([bundle.train[i] for i in range(j, j + 64)]))
             for j in range(0, 256, 64)]  # 4 training batches: example input and Taylor gradients
    dense_macs = structured.macs(base, s["x1"])
    reached = {}

    def pruned_row(name, model, cut, secs, size, size_of, note):
        acc = evaluate_accuracy(model, bundle.test)
        m = structured.macs(model, s["x1"])
        return acc_row(3, f"{name}, {dense_macs / m:.2f}x fewer MACs + ft", "PyTorch eager", acc, s["acc0"],
                       size=size, size_of=size_of, macs=f"{m:,}", lat=latency(base, model, s["x64"], s["t"]),
                       note=f"after the cut {cut:.2%}; {note}; {secs:.0f}s", pruned=True)

    def modelpress_row():
        t = time.perf_counter()
        model = prune(base, ChannelPruning(target_macs_reduction=structured.MAC_TARGET, importance="taylor",
                                           round_to=8), calib).eval()
        cut = evaluate_accuracy(model, bundle.test)
        structured.fine_tune(model, bundle, ft)
        reached["x"] = 1 - structured.macs(model, s["x1"]) / dense_macs
        reached["shapes"] = conv_shapes(model)
        size = save_artifact(model, d / "resnet-modelpress.safetensors").stat().st_size
        return [pruned_row("modelpress prune.channels taylor round_to=8", model, cut, time.perf_counter() - t,
                           size, "modelpress artifact (.safetensors)",
                           f"target_macs_reduction={structured.MAC_TARGET}, 4 batches for Taylor; "
                           f"fine-tune {ft.epochs:g} epochs Adam lr {ft.lr:g}")]

    def tp_row(importance):
        def run():
            tp = need("torch_pruning")
            t = time.perf_counter()
            target = reached.get("x", structured.MAC_TARGET)  # the modelpress row's reduction when it ran
            model, ratio = structured.torch_pruning_to(base, s["x1"], target, calib, importance, 8)
            cut = evaluate_accuracy(model, bundle.test)
            structured.fine_tune(model, bundle, ft)
            model.zero_grad()
            size = saved_bytes(tp.state_dict(model), d / f"resnet-tp-{importance}.pt")
            same = ("same" if conv_shapes(model) == reached.get("shapes") else "other") + " conv shapes as modelpress"
            return [pruned_row(f"Torch-Pruning MetaPruner {importance} round_to=8", model, cut,
                               time.perf_counter() - t, size, "torch.save(tp.state_dict(model))",
                               f"uniform pruning_ratio {ratio:.3f} bisected to the modelpress MACs, fc ignored; "
                               f"{same}; same fine-tune, seed 0")]
        return guarded(3, f"Torch-Pruning MetaPruner {importance}", "PyTorch eager", run)

    rows += guarded(3, "modelpress prune.channels taylor", "PyTorch eager", modelpress_row)
    rows += tp_row("taylor") + tp_row("l1")
    rows += cnn_ptq_peers(3, base, s, d, "resnet_small")
    mp = next((r for r in rows if r["row"].startswith("modelpress") and "acc" in r), None)
    tps = [r["acc"] for r in rows if r["row"].startswith("Torch-Pruning") and "acc" in r]
    if mp is not None:
        mp["tp_best"] = max(tps) if tps else None
        mp["target"] = (bool(tps) and round(mp["acc"], 4) >= round(max(tps), 4)
                        and min(v[2] for v in mp["lat"].values()) >= T3_SPEEDUP)
    for r in rows:
        if r.get("bytes"):
            r["x_smaller"] = s["fp32_bytes"] / r["bytes"]
    return rows


# -- task 4: the seeds' Keras LeNet-5 in LiteRT ------------------------------------------------
TFMOT = {"dir": None, "python": None}  # set from --tfmot-dir / --tf-python


def keras_lenet5_rows(quick: bool, d: Path) -> list[dict]:
    """TFMOT's int8 .tflite rows and modelpress's, from keras_lenet5.py, in this table's columns."""
    return guarded(4, "TF Model Optimization and modelpress", "LiteRT", lambda: _keras_lenet5_rows(quick, d))


def _keras_lenet5_rows(quick: bool, d: Path) -> list[dict]:
    import gzip

    need("litert_torch"), need("keras")
    import keras_lenet5 as kl

    from modelpress.runtime import Deployed

    folder = Path(TFMOT["dir"]) if TFMOT["dir"] else d / "tfmot"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tfmot_rows.json").exists() and not TFMOT["python"]:
        raise PeerMissing("no TFMOT run: pass --tfmot-dir (a keras_lenet5_tfmot.py run) or --tf-python (the "
                          "TensorFlow venv of constraints-tf.txt)")
    found = kl.tfmot_rows(folder, TFMOT["python"], quick)
    args = argparse.Namespace(dense_ratio=0.3, sparsity=0.8, fc_bits=2, epochs=12, quick=quick)
    found += kl.modelpress_rows(folder / "lenet5.h5", d, args)
    bundle = load_dataset("mnist5k?normalize=false")
    x, y = bundle.test.tensors
    fp32 = next(r for r in found if "fp32" in r["name"] and "int8" not in r["name"] and "PTQ" not in r["name"])
    acc0 = kl.litert_accuracy(Path(fp32["path"]), x, y)
    t = timing(quick)
    out = []
    for r in found:
        path = Path(r["path"])
        data = path.read_bytes()
        acc, gz = kl.litert_accuracy(path, x, y), len(gzip.compress(data, 9))
        lat = None
        if r is not fp32:
            lat = {}
            for threads in (1, 2):
                c = compare_latency(Deployed(fp32["path"], "litert"), Deployed(path, "litert"), x[:1],
                                    threads=threads, warmup=t[0], repeats=t[1], min_time_s=t[2])
                lat[threads] = (c.a.median_ms, c.b.median_ms, c.ratio)
        toolkit = "TF Model Optimization" if r["name"].startswith("TFMOT") else "modelpress"
        name = f"{toolkit}: {r['name'].removeprefix('TFMOT ').removeprefix('modelpress ')}"
        row = make_row(4, name, "LiteRT", f"{acc:.2%} ({100 * (acc - acc0):+.2f} pt)", size=len(data),
                       size_of=f".tflite (gzip {gz:,} B)", lat=lat, note=r.get("note", ""), acc=acc,
                       drop=100 * (acc0 - acc), gz=gz, reference=r is fp32)
        if toolkit == "modelpress" and "fp32 model" not in r["name"]:
            row["target"] = gz <= T4_GZIP and round(row["drop"], 2) <= T4_DROP
        out.append(row)
    return out


# -- table ----------------------------------------------------------------------------------
TASKS = {1: lenet_rows, 2: minilm_rows, 3: resnet_rows, 4: keras_lenet5_rows}


def rows(task: int, quick: bool = False) -> list[dict]:
    """The rows of one task (1 LeNet-5, 2 MiniLM, 3 resnet_small), each a dict: task, row, runtime,
    quality, bytes, size_of, x_smaller, macs, lat {threads: (fp32 ms, row ms, fp32 / row)}, target
    (True / False / None), note; plus acc / drop or spearman / fidelity where measured."""
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # fine-tunes and calibration on one thread; timings set their own
    try:
        with tempfile.TemporaryDirectory(prefix=f"peers-task{task}-") as d:
            return TASKS[task](quick, Path(d))
    finally:
        torch.set_num_threads(previous)


def _lat_cell(rows_: list[dict], r: dict, threads: int) -> str:
    if r.get("reference"):  # the fp32 row of this runtime: its median from the first comparison against it
        runtime = r["runtime"]
        ref = next((x["lat"][threads][0] for x in rows_ if x.get("lat") and x["runtime"] == runtime
                    and x["task"] == r["task"]), None)
        return "-" if ref is None else f"{ref:.2f} ms (1.00x)"
    if not r.get("lat"):
        return "-"
    _, ms, x = r["lat"][threads]
    return f"{ms:.2f} ms ({x:.2f}x)"


def print_table(table: list[dict]) -> None:
    header = ["task", "toolkit + method", "runs on", "quality", "bytes on disk", "file", "x smaller", "MACs/sample",
              "latency 1 thr (x vs fp32)", "latency 2 thr", "target met", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        target = {True: "yes", False: "no", None: ""}[r.get("target")]
        cells = [str(r["task"]), r["row"], r["runtime"], r["quality"], f"{r['bytes']:,}" if r.get("bytes") else "-",
                 r["size_of"] or "-", f"{r['x_smaller']:.1f}" if r.get("x_smaller") else "-", r["macs"],
                 _lat_cell(table, r, 1), _lat_cell(table, r, 2), target, r.get("note", "")]
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")


def contended(table: list[dict]) -> list[str]:
    """Tasks whose fp32 reference ran slower on 2 threads than on 1: another process held a core, so
    that task's 2-thread ratios measure the machine's load more than the models."""
    out = []
    for r in table:
        if r.get("lat") and r["lat"][2][0] > r["lat"][1][0] and (r["task"], r["runtime"]) not in {
                (t, rt) for t, rt, _ in out}:
            out.append((r["task"], r["runtime"], f"{r['lat'][1][0]:.2f} ms -> {r['lat'][2][0]:.2f} ms"))
    return [f"task {t}, {rt}: fp32 {ms} from 1 to 2 threads" for t, rt, ms in out]


def targets_summary(table: list[dict]) -> list[str]:
    out = []
    mp = {r["task"]: r for r in table if r["row"].startswith("modelpress") and not r.get("failed")
          and (r["task"] != 4 or r.get("target") is not None)}  # task 4: the compressed row, not plain int8
    tasks = sorted({r["task"] for r in table})
    missing = {r["task"]: r["note"] for r in table if r["row"].startswith("modelpress") and r.get("failed")}
    for task in tasks:
        r = mp.get(task)
        met = "met" if r and r["target"] else "NOT met"
        if task == 1:
            goal = f"task 1: modelpress >= {T1_RATIO:g}x smaller than the fp32 artifact, drop <= {T1_DROP} pt"
            got = f"{r['x_smaller']:.1f}x, {r['drop']:+.2f} pt" if r else None
        elif task == 2:
            goal = (f"task 2: modelpress >= {T2_SPEEDUP}x faster than ORT dynamic int8 at batch 32 (1 and 2 thr), "
                    f"Spearman within {T2_SPEARMAN_TOL} of fp32, <= {T2_BYTES:,} B")
            vs = r.get("vs_ort_int8") if r else None
            got = (f"{vs[1]:.2f}x / {vs[2]:.2f}x" if vs else "not timed") + (
                f", Spearman {r['spearman']:.4f} vs {r['spearman0']:.4f}, {r['bytes']:,} B" if r else "")
        elif task == 4:
            goal = f"task 4: modelpress .tflite <= {T4_GZIP:,} B gzipped within {T4_DROP} pt of the Keras fp32 model"
            got = f"{r['gz']:,} B gzipped, {-r['drop']:+.2f} pt" if r else None
        else:
            goal = (f"task 3: at ~2x fewer MACs modelpress accuracy >= Torch-Pruning's, speed-up >= {T3_SPEEDUP}x "
                    f"(1 and 2 thr)")
            got = (f"{r['acc']:.2%} vs Torch-Pruning best "
                   + (f"{r['tp_best']:.2%}" if r.get("tp_best") is not None else "n/a")
                   + f", {r['lat'][1][2]:.2f}x / {r['lat'][2][2]:.2f}x") if r else None
        out.append(f"- {goal}: **{met}** ({got})" if r else f"- {goal}: **not measured** ({missing.get(task, '')})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="1,2,3", help="comma-separated task numbers (1 LeNet-5, 2 MiniLM, "
                                                         "3 resnet_small, 4 the seeds' Keras LeNet-5 in LiteRT)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 fine-tune steps, few timings")
    parser.add_argument("--tfmot-dir", default=None, help="task 4: a keras_lenet5_tfmot.py run to reuse")
    parser.add_argument("--tf-python", default=None, help="task 4: python of the TensorFlow venv (constraints-tf.txt)")
    args = parser.parse_args()
    TFMOT.update(dir=args.tfmot_dir, python=args.tf_python)
    tasks = [int(t) for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    table, took = [], {}
    for task in tasks:
        t = time.perf_counter()
        table += rows(task, args.quick)
        took[task] = time.perf_counter() - t
    print_table(table)
    print("\nTargets:\n" + "\n".join(targets_summary(table)))
    busy = contended(table)
    if busy:
        print("\n2-thread timings were contended (the fp32 reference got slower with a second thread: another "
              "process held a core; read those ratios as noise): " + "; ".join(busy))
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for dist in ("onnxruntime", "torch-pruning", "nncf", "torchao"):
        try:
            versions.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            versions.append(f"{dist} missing")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"task {k} {v:.0f} s" for k, v in took.items()) + f"), torch {torch.__version__}, "
          + ", ".join(versions) + f", {os.cpu_count()} CPU cores, load average {load0:.1f} at start and "
          f"{os.getloadavg()[0]:.1f} at the end. Latency: median of calls alternating with the "
          "fp32 model of the same runtime (x = fp32 / row; batch 64 for CNNs, 32 sentences for MiniLM). "
          "x smaller: the task's fp32 modelpress artifact / the row's file.")


if __name__ == "__main__":
    main()
