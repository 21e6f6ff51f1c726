"""Peer weight quantizers for the LLM benchmark (issue 16): every peer toolkit that installs here, on the same
model, calibration batches and bits, one row each; a peer that cannot install or run on CPU is a row saying why.

Peers (int4 at block / group 128, symmetric where the peer offers it, all ``nn.Linear`` / all MatMuls with a
constant weight):

* ONNX Runtime ``MatMulNBitsQuantizer`` on the fp32 ONNX file: RTN, GPTQ (the calibration batches through a
  ``CalibrationDataReader``) and HQQ (asymmetric by design: zero points), ``accuracy_level`` 4;
* torchao ``quantize_``: ``Int4WeightOnlyConfig(group_size=128)`` (its default packing needs the CUDA-only
  ``mslk``: a row that says so), the CPU int4 layout ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``,
  tinygemm CPU kernel, asymmetric) and ``Int8WeightOnlyConfig()`` (per row);
* optimum-quanto ``quantize(weights=qint4 / qint8)`` + ``freeze`` (qint4: group 128 with scale and shift;
  its CPU kernels are compiled on first use, minutes, cached in ~/.cache/torch_extensions);
* llm-compressor ``oneshot``: GPTQ and AWQ (W4A16, group 128, symmetric) and SmoothQuant (alpha 0.8) + W8A8 (int8
  weights per channel by RTN, int8 activations per token, dynamic). It pins transformers below modelpress' version,
  so it runs in its own venv (``benchmarks/llm_peers_llmc.py``); its compressed-tensors folder is loaded back
  here with transformers + compressed-tensors (decompressed on CPU) to score it.

Columns: the quality the testbed's ``evaluate`` returns (MiniLM: Spearman / fidelity as ``benchmarks/llm.py``
computes them), bytes of what the peer itself saves (.onnx; ``torch.save`` of the state dict for torchao;
safetensors + quantization map for quanto; the compressed-tensors folder for llm-compressor), bits per
quantized weight (packed weights + scales + zero points over the quantized weights' count), calibration /
quantization seconds, and batch-1 latency vs fp32 at 1 and 2 threads on each of the testbed's timed inputs: ONNX
rows against the fp32 ONNX Runtime file, eager rows (torchao, quanto) against the fp32 eager model, timed
alternately in one process (``compare_latency``).

Testbeds: ``minilm`` (the bundled all-MiniLM-L6-v2 as in ``benchmarks/llm.py``: 256 sentences of the
everyday corpus in batches of 16 for calibration, graded pairs for quality, one sentence timed); ``pylm`` /
``pylm-tiny`` (the decoder trained here, ``src/modelpress/zoo/pylm.py``; ``hf_dir`` its cached Hugging Face
folder; quality = held-out perplexity and token accuracy through the dataset bundle's ``evaluate``, which takes
an eager model or an :class:`OrtModule` alike; timed on one token, a decode-step proxy without KV cache, and on
one block, a prefill); ``tiny-llama`` (a random-init Llama-style decoder saved as an HF folder, random token
batches; quality = logit cosine and KL vs fp32: a development check, not a quality claim). ``benchmarks/llm.py``
prints these rows in one table with modelpress' own rows.

    python benchmarks/llm_peers.py                        # MiniLM, every peer (~15 min on 2 idle cores)
    python benchmarks/llm_peers.py --testbed pylm-tiny --quick
    python benchmarks/llm_peers.py --peers ort-rtn,torchao-int8   # a subset (names: --list)
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import itertools
import json
import math
import os
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from peers import quiet  # noqa: E402  (silences a peer's progress bars, notices and warnings for one call)

from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.core.compat import prepare_torchvision  # noqa: E402
from modelpress.export.onnx import export_onnx, onnx_inputs, ort_feeds, ort_session  # noqa: E402

prepare_torchvision()  # transformers (imported by quanto, compressed-tensors) imports a broken torchvision here

LLMC_PYTHON = os.environ.get("MODELPRESS_LLMC_PYTHON", "/work/peers-venv/bin/python")
LLMC_WORKER = Path(__file__).resolve().parent / "llm_peers_llmc.py"
LLMC_VENV_HINT = ("python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install torch==2.13.0 "
                  "llmcompressor==0.14.0.1 (then MODELPRESS_LLMC_PYTHON=/work/peers-venv/bin/python)")


# -- what a peer gets ------------------------------------------------------------------------------
@dataclass
class Testbed:
    """One model and its data, the same for every peer.

    ``model``: the fp32 eager model, called as ``model(**inputs)``; ``calib``: calibration batches (dicts of
    int64 ``[batch, seq]`` tensors); ``example``: one batch-1 input (ONNX export and latency); ``evaluate``:
    scores a quantized model (an eager module or :class:`OrtModule`, both called like ``model``) -> dict.
    ``hf_dir``: the Hugging Face folder of the part ``hf_module`` of ``model`` (``""``: ``model`` itself,
    ``"backbone"`` for a SentenceEncoder, ``"hf"`` for HFLogits): llm-compressor quantizes that folder and its
    result is put back there. ``awq_mappings`` / ``smooth_mappings``: ``[(smooth layer, [balance layers])]``
    regexes for llm-compressor where its defaults (Llama names) do not fit the architecture. ``timed``: the
    batch-1 inputs latency is measured on, by label (default ``{"batch 1": example}``); ``task``: what
    ``run_method`` gets as ``MethodInputs.task``.
    """

    name: str
    model: nn.Module
    calib: list[dict[str, torch.Tensor]]
    example: dict[str, torch.Tensor]
    evaluate: Callable[[Any], dict[str, float]]
    workdir: Path
    hf_dir: Path | None = None
    hf_module: str = ""
    awq_mappings: list | None = None
    smooth_mappings: list | None = None
    notes: str = ""
    timed: dict[str, dict[str, torch.Tensor]] | None = None
    task: Any = None
    fp32_onnx: Path | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def onnx(self) -> Path:
        """The fp32 ONNX file every ONNX row starts from (exported once)."""
        if self.fp32_onnx is None:
            self.fp32_onnx = export_onnx(self.model, self.example, self.workdir / "fp32.onnx")
        return self.fp32_onnx

    def timing_inputs(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.timed or {"batch 1": self.example}


@dataclass
class Settings:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    accuracy_level: int = 4
    threads: tuple[int, ...] = (1, 2)
    warmup: int = 3
    repeats: int = 20
    smoothquant_alpha: float = 0.8
    llmc_timeout_s: int = 1200


def as_batches(data: list) -> list[dict[str, torch.Tensor]]:
    """Calibration inputs as dicts of ``[batch, seq]`` tensors: token-id tensors (1-D or 2-D) or dicts."""
    out = []
    for item in data:
        d = dict(item) if isinstance(item, dict) else {"input_ids": item}
        out.append({k: v.unsqueeze(0) if v.ndim == 1 else v for k, v in d.items()})
    return out


class OrtModule(nn.Module):
    """An ONNX file behind the eager model's call signature, so ``evaluate`` scores it like the model."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        self.path = path
        self.session = ort_session(path, threads=threads, spinning=False)

    def forward(self, *args, **inputs):
        feeds = ort_feeds(self.session, inputs if inputs else args[0])
        return torch.from_numpy(self.session.run(None, feeds)[0])


class NoGrad(nn.Module):
    """Runs ``model`` under ``no_grad`` even inside ``inference_mode`` (what ``compare_latency`` uses)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.model(*args, **kwargs)


# -- rows ------------------------------------------------------------------------------------------
class PeerUnavailable(Exception):
    """The peer cannot install or run here: its row says why."""


class WorkerFailed(Exception):
    """The llm-compressor worker exited with an error: the message is its own last error line."""


def row(name: str, **kw) -> dict:
    return {"row": name, "quality": None, "bytes": None, "bytes_of": "", "bpw": None, "seconds": None,
            "lat": None, "runtime": "", "note": "", "failed": False, **kw}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def latency(tb: Testbed, s: Settings, ref: Any, cand: Any) -> dict:
    """{(input label, threads): (fp32 ms, candidate ms, fp32 / candidate)} on each of the testbed's batch-1
    inputs, the two timed alternately in one process."""
    out = {}
    for label, inputs in tb.timing_inputs().items():
        for t in s.threads:
            c = compare_latency(ref, cand, inputs, threads=t, warmup=s.warmup, repeats=s.repeats)
            out[label, t] = (c.a.median_ms, c.b.median_ms, c.ratio)
    return out


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def need(module: str, dist: str):
    import importlib

    try:
        with quiet():
            return importlib.import_module(module)
    except ImportError as exc:
        raise PeerUnavailable(f"{dist} not installed (pip install -c constraints.txt -e '.[peers]'): "
                              f"{first_line(exc)}") from None


# -- bits per weight -------------------------------------------------------------------------------
def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly nested) tensor subclass stores."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names if getattr(t, n, None) is not None for x in _inner_tensors(getattr(t, n))]


def eager_bits(model: nn.Module) -> tuple[float | None, int]:
    """(bits per weight over the quantized Linear weights, their count) of a torchao / quanto model."""
    bits, count, layers = 0, 0, 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and w is not None and type(w) not in (torch.Tensor, nn.Parameter):
            data = w.data if isinstance(w, nn.Parameter) else w
            bits += 8 * sum(x.numel() * x.element_size() for x in _inner_tensors(data))
            count += math.prod(w.shape)
            layers += 1
    return (bits / count if count else None), layers


def onnx_bits(path: Path) -> tuple[float | None, int]:
    """(bits per weight over the MatMulNBits weights: packed B + scales + zero points, their count)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    bits, count, layers = 0, 0, 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        for name in node.input[1:4]:  # B, scales, zero_points
            if name in inits:
                bits += 8 * numpy_helper.to_array(inits[name]).nbytes
        count += attrs["K"] * attrs["N"]
        layers += 1
    return (bits / count if count else None), layers


def compressed_tensors_bits(folder: Path) -> tuple[float | None, int]:
    """(bits per weight over the quantized weights of a compressed-tensors folder, their count)."""
    from safetensors import safe_open

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    bits, count, layers = 0, 0, 0
    for key in tensors:
        if not key.endswith(".weight_scale"):
            continue
        prefix = key[: -len("weight_scale")]
        parts = [p for p in ("weight_packed", "weight", "weight_scale", "weight_zero_point") if prefix + p in tensors]
        if prefix + "weight_shape" in tensors:
            n = math.prod(int(x) for x in tensors[prefix + "weight_shape"].tolist())
        else:
            n = tensors[prefix + "weight"].numel()
        bits += 8 * sum(tensors[prefix + p].numel() * tensors[prefix + p].element_size() for p in parts)
        count += n
        layers += 1
    return (bits / count if count else None), layers


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- ONNX Runtime MatMulNBitsQuantizer -------------------------------------------------------------
def ort_matmulnbits(tb: Testbed, s: Settings, algo: str) -> dict:
    """ONNX Runtime's int4 weight-only quantizer on the fp32 ONNX file: ``algo`` RTN, GPTQ or HQQ."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    fp32 = tb.onnx()
    dest = tb.workdir / f"ort-{algo.lower()}.onnx"
    note = f"block {s.group_size}, accuracy_level {s.accuracy_level}"
    if algo == "RTN":
        cfg, sym = mnq.RTNWeightOnlyQuantConfig(), s.symmetric
    elif algo == "GPTQ":
        names = {i.name for i in onnx.load(str(fp32), load_external_data=False).graph.input}
        feeds = [{k: v for k, v in onnx_inputs(b).items() if k in names} for b in tb.calib]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

            def rewind(self):
                self.it = iter(feeds)

        cfg, sym = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=s.group_size), s.symmetric
        note += f", {len(feeds)} calibration batches, defaults (percdamp 0.01, no act-order)"
    elif algo == "HQQ":
        cfg, sym = mnq.HQQWeightOnlyQuantConfig(block_size=s.group_size, bits=s.bits), False
        note += ", HQQ is asymmetric (zero points)"
    else:
        raise ValueError(algo)
    note = ("symmetric, " if sym else "asymmetric, ") + note
    t0 = time.perf_counter()
    with quiet():
        q = mnq.MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=s.bits, block_size=s.group_size, is_symmetric=sym,
                                     accuracy_level=s.accuracy_level, algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(dest), use_external_data_format=False)
    seconds = time.perf_counter() - t0
    qmodel = onnx.load(str(dest))
    nodes = [n for n in qmodel.graph.node if n.op_type == "MatMulNBits"]
    levels = sorted({a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"})
    if levels != [s.accuracy_level]:  # HQQ's path drops the quantizer's accuracy_level: set it, as for the others
        for n in nodes:
            for a in [a for a in n.attribute if a.name == "accuracy_level"]:
                n.attribute.remove(a)
            n.attribute.append(onnx.helper.make_attribute("accuracy_level", s.accuracy_level))
        onnx.save(qmodel, str(dest))
        note += (f"; the quantizer wrote accuracy_level {levels or 'unset (0: fp32 compute)'}, this script set "
                 f"{s.accuracy_level} on the nodes")
    bpw, layers = onnx_bits(dest)
    return row(f"ORT MatMulNBitsQuantizer {algo} w{s.bits} b{s.group_size}", runtime="ONNX Runtime",
               quality=tb.evaluate(OrtModule(dest)), bytes=dest.stat().st_size, bytes_of=".onnx", bpw=bpw,
               seconds=seconds, lat=latency(tb, s, fp32, dest), note=f"{note}; {layers} MatMulNBits")


# -- torchao ---------------------------------------------------------------------------------------
def torchao_weight_only(tb: Testbed, s: Settings, kind: str) -> dict:
    """torchao ``quantize_`` on a copy of the eager model: ``kind`` int4 (the stable config), int4-cpu (the
    prototype CPU layout) or int8."""
    need("torchao", "torchao")
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if kind == "int4":
        cfg, name = Int4WeightOnlyConfig(group_size=s.group_size), f"Int4WeightOnlyConfig(group_size={s.group_size})"
        note = "stable int4 config, default packing (plain)"
    elif kind == "int4-cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        cfg = PrototypeInt4WeightOnlyConfig(group_size=s.group_size)
        name = f"PrototypeInt4WeightOnlyConfig(group_size={s.group_size})"
        note = "Int4OpaqueTensor, tinygemm CPU kernel, asymmetric (scale + zero per group)"
    elif kind == "int8":
        cfg, name, note = Int8WeightOnlyConfig(), "Int8WeightOnlyConfig()", "int8 per output row, symmetric"
    else:
        raise ValueError(kind)
    model = copy.deepcopy(tb.model).eval()
    t0 = time.perf_counter()
    with quiet():
        quantize_(model, cfg)
        with torch.inference_mode():
            model(**tb.example)  # a layout that cannot run on CPU fails here, not in the middle of the scoring
    seconds = time.perf_counter() - t0
    path = tb.workdir / f"torchao-{kind}.pt"
    torch.save(model.state_dict(), path)
    bpw, layers = eager_bits(model)
    with quiet(), torch.no_grad():
        quality = tb.evaluate(model)
    return row(f"torchao {name}", runtime="PyTorch eager", quality=quality, bytes=path.stat().st_size,
               bytes_of="torch.save(state_dict)", bpw=bpw, seconds=seconds, lat=latency(tb, s, tb.model, model),
               note=f"{note}; {layers} Linear; no ONNX export, latency vs fp32 eager")


# -- optimum-quanto --------------------------------------------------------------------------------
def quanto_weight_only(tb: Testbed, s: Settings, bits: int) -> dict:
    """optimum-quanto ``quantize(weights=qint4 / qint8)`` + ``freeze`` on a copy of the eager model."""
    quanto = need("optimum.quanto", "optimum-quanto")
    from safetensors.torch import save_file

    qtype = {4: quanto.qint4, 8: quanto.qint8}[bits]
    model = copy.deepcopy(tb.model).eval()
    t0 = time.perf_counter()
    with quiet():
        quanto.quantize(model, weights=qtype)
        quanto.freeze(model)
        with torch.no_grad():
            model(**tb.example)  # the first call compiles quanto's CPU kernels (cached)
    seconds = time.perf_counter() - t0
    path = tb.workdir / f"quanto-int{bits}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    qmap = path.with_suffix(".json")
    qmap.write_text(json.dumps(quanto.quantization_map(model)))
    bpw, layers = eager_bits(model)
    with quiet(), torch.no_grad():
        quality = tb.evaluate(model)
    note = ("group 128, scale + shift (asymmetric)" if bits == 4 else "per output channel, symmetric")
    note += f"; {layers} Linear; seconds include the first call (kernel build on first use); latency vs fp32 eager"
    try:
        with torch.inference_mode():
            model(**tb.example)
        timed = model
    except RuntimeError as exc:  # qint4 in torch 2.13: "Cannot set version_counter for inference tensor"
        timed = NoGrad(model)
        note += f", both timed under no_grad (under inference_mode: {first_line(exc)})"
    return row(f"optimum-quanto qint{bits} weights", runtime="PyTorch eager", quality=quality,
               bytes=path.stat().st_size + qmap.stat().st_size, bytes_of="safetensors + quantization map",
               bpw=bpw, seconds=seconds, lat=latency(tb, s, NoGrad(tb.model) if timed is not model else tb.model,
                                                     timed), note=note)


# -- llm-compressor (its own venv) -----------------------------------------------------------------
def llmc_versions() -> str:
    if not Path(LLMC_PYTHON).exists():
        return "not installed"
    code = ("import importlib.metadata as m; print(' '.join(f'{d} {m.version(d)}' for d in "
            "('llmcompressor', 'compressed-tensors', 'transformers', 'torch')))")
    res = subprocess.run([LLMC_PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    return res.stdout.strip() or res.stderr.strip().splitlines()[-1]


def load_compressed(tb: Testbed, folder: Path) -> nn.Module:
    """A copy of ``tb.model`` whose ``hf_module`` is the compressed-tensors folder, loaded by transformers
    (decompressed to float weights; quantized activations, if the scheme has them, stay in the forward)."""
    need("compressed_tensors", "compressed-tensors")
    import transformers
    from transformers.utils.quantization_config import CompressedTensorsConfig

    arch = (transformers.AutoConfig.from_pretrained(folder).architectures or ["AutoModel"])[0]
    with quiet():
        hf = getattr(transformers, arch).from_pretrained(
            folder, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    model = copy.deepcopy(tb.model).eval()
    if not tb.hf_module:
        return hf
    parent, _, attr = tb.hf_module.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, hf)
    return model


def llmcompressor_oneshot(tb: Testbed, s: Settings, algo: str) -> dict:
    """llm-compressor ``oneshot`` with a GPTQ, AWQ or SmoothQuant recipe, in its own venv."""
    label = {"GPTQ": f"GPTQ W{s.bits}A16 g{s.group_size}", "AWQ": f"AWQ W{s.bits}A16 g{s.group_size}",
             "SmoothQuant": f"SmoothQuant a{s.smoothquant_alpha} + W8A8"}[algo]
    name = f"llm-compressor {label}"
    if tb.hf_dir is None:
        raise PeerUnavailable("the testbed has no Hugging Face folder (llm-compressor loads one)")
    if not Path(LLMC_PYTHON).exists():
        raise PeerUnavailable(f"llm-compressor 0.14.0.1 pins transformers<=5.17.0,>=5.15.0 (modelpress: "
                              f"{version('transformers')}), so it needs its own venv, missing: {LLMC_VENV_HINT}")
    out = tb.workdir / f"llmc-{algo.lower()}"
    calib = tb._cache.get("llmc_calib")
    if calib is None:
        calib = tb._cache["llmc_calib"] = tb.workdir / "llmc-calib.pt"
        torch.save([{k: v.cpu() for k, v in b.items()} for b in tb.calib], calib)
    job = {"hf_dir": str(tb.hf_dir), "calib": str(calib), "algo": algo, "bits": s.bits, "group_size": s.group_size,
           "symmetric": s.symmetric, "out": str(out), "alpha": s.smoothquant_alpha,
           "mappings": tb.awq_mappings, "smooth_mappings": tb.smooth_mappings, "threads": torch.get_num_threads()}
    job_path = tb.workdir / f"llmc-{algo.lower()}.json"
    job_path.write_text(json.dumps(job))
    try:
        res = subprocess.run([LLMC_PYTHON, str(LLMC_WORKER), str(job_path)], capture_output=True, text=True,
                             timeout=s.llmc_timeout_s)
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"oneshot ran past {s.llmc_timeout_s} s on CPU") from None
    (tb.workdir / f"llmc-{algo.lower()}.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
        log = tb.workdir / f"llmc-{algo.lower()}.log"
        raise WorkerFailed(f"{err.strip()[:300]} (exit {res.returncode}; log {log})")
    result = json.loads((out / "result.json").read_text())
    model = load_compressed(tb, out / "model")
    bpw, layers = compressed_tensors_bits(out / "model")
    with quiet(), torch.no_grad():
        quality = tb.evaluate(model)
    note = {"GPTQ": "GPTQModifier defaults (act-order static, dampening 0.01, block 128)",
            "AWQ": "AWQModifier defaults (duo scaling, n_grid 20), then QuantizationModifier (RTN)",
            "SmoothQuant": "SmoothQuantModifier, then QuantizationModifier(scheme='W8A8'): int8 weights per channel "
                           "(RTN; llm-compressor's example uses GPTQModifier), int8 activations per token "
                           "(dynamic)"}[algo]
    note += "".join(f"; {n}" for n in result.get("notes", []))
    if algo == "AWQ" and tb.awq_mappings:
        note += f"; mappings {tb.awq_mappings}"
    if algo == "SmoothQuant" and tb.smooth_mappings:
        note += f"; mappings {tb.smooth_mappings}"
    return row(name, runtime="transformers (decompressed)", quality=quality, bytes=folder_bytes(out / "model"),
               bytes_of="compressed-tensors folder", bpw=bpw, seconds=result["seconds"],
               note=f"{note}; {layers} Linear; no CPU runtime for compressed-tensors (vLLM, GPU), so no latency")


# -- the table -------------------------------------------------------------------------------------
PEERS: dict[str, Callable[[Testbed, Settings], dict]] = {
    "ort-rtn": lambda tb, s: ort_matmulnbits(tb, s, "RTN"),
    "ort-gptq": lambda tb, s: ort_matmulnbits(tb, s, "GPTQ"),
    "ort-hqq": lambda tb, s: ort_matmulnbits(tb, s, "HQQ"),
    "torchao-int4": lambda tb, s: torchao_weight_only(tb, s, "int4"),
    "torchao-int4-cpu": lambda tb, s: torchao_weight_only(tb, s, "int4-cpu"),
    "torchao-int8": lambda tb, s: torchao_weight_only(tb, s, "int8"),
    "quanto-int4": lambda tb, s: quanto_weight_only(tb, s, 4),
    "quanto-int8": lambda tb, s: quanto_weight_only(tb, s, 8),
    "llmc-gptq": lambda tb, s: llmcompressor_oneshot(tb, s, "GPTQ"),
    "llmc-awq": lambda tb, s: llmcompressor_oneshot(tb, s, "AWQ"),
    "llmc-smoothquant": lambda tb, s: llmcompressor_oneshot(tb, s, "SmoothQuant"),
}
PEER_LABELS = {
    "ort-rtn": "ORT MatMulNBitsQuantizer RTN", "ort-gptq": "ORT MatMulNBitsQuantizer GPTQ",
    "ort-hqq": "ORT MatMulNBitsQuantizer HQQ", "torchao-int4": "torchao Int4WeightOnlyConfig",
    "torchao-int4-cpu": "torchao PrototypeInt4WeightOnlyConfig", "torchao-int8": "torchao Int8WeightOnlyConfig",
    "quanto-int4": "optimum-quanto qint4", "quanto-int8": "optimum-quanto qint8",
    "llmc-gptq": "llm-compressor GPTQ", "llmc-awq": "llm-compressor AWQ",
    "llmc-smoothquant": "llm-compressor SmoothQuant",
}
QUICK = ("ort-rtn", "torchao-int4", "torchao-int8", "quanto-int8", "llmc-gptq")


def run_peer(key: str, tb: Testbed, s: Settings) -> dict:
    """One peer's row; a peer that cannot install or run is a row with the exact error (one line)."""
    t0 = time.perf_counter()
    try:
        return PEERS[key](tb, s)
    except PeerUnavailable as exc:
        return row(f"{PEER_LABELS[key]}: not run", note=str(exc), failed=True)
    except WorkerFailed as exc:
        return row(f"{PEER_LABELS[key]}: failed", failed=True, note=f"{exc} (after {time.perf_counter() - t0:.0f} s)")
    except Exception as exc:  # noqa: BLE001 - a peer failing is a result to print
        return row(f"{PEER_LABELS[key]}: failed", failed=True,
                   note=f"{first_line(exc)} (after {time.perf_counter() - t0:.0f} s)")


def fp32_rows(tb: Testbed, s: Settings) -> list[dict]:
    with torch.no_grad():
        eager = tb.evaluate(tb.model.eval())
    path = tb.workdir / "fp32.safetensors"
    from safetensors.torch import save_model

    save_model(tb.model, str(path))
    onnx_path = tb.onnx()
    return [row("fp32", runtime="PyTorch eager", quality=eager, bytes=path.stat().st_size, bytes_of="safetensors",
                bpw=32.0, seconds=0.0),
            row("fp32", runtime="ONNX Runtime", quality=tb.evaluate(OrtModule(onnx_path)),
                bytes=onnx_path.stat().st_size, bytes_of=".onnx", bpw=32.0, seconds=0.0)]


def peer_rows(tb: Testbed, s: Settings | None = None, peers: list[str] | None = None, *,
              verbose: bool = True) -> list[dict]:
    """fp32 reference rows, then one row per peer (``peers``: keys of :data:`PEERS`, default all)."""
    s = s or Settings()
    rows = fp32_rows(tb, s)
    for key in peers or list(PEERS):
        rows.append(run_peer(key, tb, s))
        if verbose:
            print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    """One progress line: the row, its runtime, its quality (or why it has none) and its seconds."""
    q = ", ".join(f"{k} {v:.4f}" for k, v in (r["quality"] or {}).items())
    secs = f" ({r['seconds']:.1f} s)" if r["seconds"] else ""
    print(f"{r['row']} [{r['runtime'] or '-'}]: {q or r['note']}{secs}", flush=True)


def peer_versions() -> dict[str, str]:
    return {"onnxruntime": version("onnxruntime"), "torchao": version("torchao"),
            "optimum-quanto": version("optimum-quanto"), "compressed-tensors (loader)": version("compressed-tensors"),
            "llm-compressor venv": llmc_versions(), "transformers": version("transformers"),
            "torch": torch.__version__}


def print_table(rows: list[dict], title: str = "", delta: str | None = None) -> None:
    """One markdown table; ``delta``: a quality key also shown as its change from the first row's (fp32)."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def lat(r, key):
        v = (r.get("lat") or {}).get(key)
        return "-" if v is None else f"{v[1]:.2f} ms vs {v[0]:.2f} ({v[2]:.2f}x)"

    keys = list(dict.fromkeys(k for r in rows for k in (r["quality"] or {})))
    timed = list(dict.fromkeys(k for r in rows for k in (r.get("lat") or {}))) or [("batch 1", 1), ("batch 1", 2)]
    ref = (rows[0]["quality"] or {}).get(delta) if rows and delta else None
    extra = [f"{delta} vs fp32"] if ref is not None else []
    if title:
        print(f"\n{title}")
    print("\n| row | runtime | " + " | ".join(keys + extra) + " | bytes | bytes of | bits / weight | calibration s | "
          + " | ".join(f"{label}, {t} thread{'s' if t > 1 else ''} vs fp32" for label, t in timed) + " | notes |")
    print("|---" * (len(keys) + len(extra) + 7 + len(timed)) + "|")
    for r in rows:
        q = r["quality"] or {}
        cells = [f(q.get(k), ".4f") for k in keys]
        if extra:
            cells.append("-" if q.get(delta) is None else f"{q[delta] - ref:+.4f}")
        print(f"| {r['row']} | {r['runtime'] or '-'} | " + " | ".join(cells)
              + f" | {f(r['bytes'], ',')} | {r['bytes_of'] or '-'} | {f(r['bpw'], '.2f')} | {f(r['seconds'], '.1f')} | "
              + " | ".join(lat(r, k) for k in timed) + f" | {r['note'] or ''} |")


# -- testbeds --------------------------------------------------------------------------------------
def minilm_testbed(workdir: Path, calib_sentences: int = 256) -> Testbed:
    """The bundled MiniLM exactly as ``benchmarks/llm.py`` scores it: Spearman and fidelity on the graded pairs,
    256 sentences of the everyday corpus in batches of 16 for calibration, one sentence for latency."""
    from modelpress.tasks.embedding import embed_sentences, embedding_quality, pair_sentences, tokenize
    from modelpress.zoo.corpora import load_sentences, load_sts_pairs, minilm_path
    from modelpress.zoo.models import build_model

    torch.manual_seed(0)
    dense = build_model("minilm").eval()
    tok = dense.tokenizer
    pairs = load_sts_pairs()
    ref = embed_sentences(dense, tok, pair_sentences(pairs))
    calib = load_sentences(calib_sentences, corpus="everyday")
    batches = [tokenize(tok, calib[i:i + 16]) for i in range(0, len(calib), 16)]
    one = tokenize(tok, pair_sentences(pairs)[:1])

    def evaluate(model) -> dict[str, float]:
        q = embedding_quality(model, pairs, reference=ref, tokenizer=tok)
        return {"Spearman": q["spearman"], "fidelity": q["fidelity"]}

    # Post-LN BERT: a LayerNorm's output is also the residual stream, so only value -> attention.output.dense
    # can take AWQ / SmoothQuant scales without changing the float model (llm-compressor's defaults name
    # Llama's layers: input_layernorm, q_proj ...).
    v_to_o = [("re:.*attention\\.self\\.value$", ["re:.*attention\\.output\\.dense$"])]
    return Testbed("minilm", dense, batches, one, evaluate, workdir, hf_dir=minilm_path(), hf_module="backbone",
                   awq_mappings=v_to_o, smooth_mappings=v_to_o,
                   notes=f"all-MiniLM-L6-v2 (bundled); calibration {len(calib)} everyday sentences in "
                         f"{len(batches)} batches of 16; quality on {len(pairs)} graded pairs")


def tiny_llama_dir(dest: Path, seed: int = 0) -> Path:
    """A random-init Llama-style decoder (hidden 256, 4 layers, 8 heads / 2 kv heads, SwiGLU 768, vocab 4096)
    saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=768, vocab_size=4096, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(dest)
    return dest


def logit_fidelity(model: nn.Module, reference: torch.Tensor, batches: list[dict]) -> dict[str, float]:
    """Mean cosine of the logits and mean KL(fp32 || model) of the next-token distributions vs fp32."""
    outs = [model(**b).float() for b in batches]
    logits = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
    cos = F.cosine_similarity(logits, reference, dim=-1).mean()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean")
    return {"logit cosine": float(cos), "KL": float(kl)}


def decoder_testbed(hf_dir: Path, workdir: Path, calib: list, held_out: list, name: str = "decoder",
                    example: dict | None = None) -> Testbed:
    """Any causal LM folder: quality = logit cosine and KL vs fp32 on ``held_out`` batches (token-id tensors
    or dicts). A trained testbed (perplexity) passes its own ``evaluate`` to :class:`Testbed` instead."""
    from transformers import AutoModelForCausalLM

    from modelpress.artifact.hf import HFLogits

    model = HFLogits(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()).eval()
    calib, held_out = as_batches(calib), as_batches(held_out)
    with torch.inference_mode():
        ref = torch.cat([model(**b).float().reshape(-1, model.hf.config.vocab_size) for b in held_out])
    example = example or {"input_ids": held_out[0]["input_ids"][:1]}
    return Testbed(name, model, calib, example, lambda m: logit_fidelity(m, ref, held_out), workdir,
                   hf_dir=hf_dir, hf_module="hf", timed={f"{example['input_ids'].shape[-1]}-token prefill": example},
                   notes=f"{len(calib)} calibration batches {tuple(calib[0]['input_ids'].shape)}, "
                         f"{len(held_out)} held-out batches")


def tiny_llama_testbed(workdir: Path) -> Testbed:
    """The random-init tiny Llama on uniform random tokens: 8 calibration batches of 8 x 128 tokens, 4
    held-out batches, latency on one 128-token sequence (a prefill; decode latency needs the KV cache)."""
    hf_dir = tiny_llama_dir(workdir / "tiny-llama")
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 4096, (8, 128), generator=g) for _ in range(8)]
    held_out = [torch.randint(0, 4096, (8, 128), generator=g) for _ in range(4)]
    return decoder_testbed(hf_dir, workdir, calib, held_out, name="tiny-llama (random init)")


def pylm_testbed(workdir: Path, model: str = "pylm", eval_blocks: int | None = 256, calibration_batches: int = 16,
                 seed: int = 0) -> Testbed:
    """The decoder testbed ``model`` (``"pylm"`` or ``"pylm-tiny"``, ``src/modelpress/zoo/pylm.py``; trained and
    cached on first use): quality = perplexity and top-1 next-token accuracy on ``eval_blocks`` evenly spaced
    held-out blocks (None: all); calibration: the first ``calibration_batches`` batches of the training split (8
    blocks each, shuffled once with ``seed``); ``hf_dir``: the cached Hugging Face folder. Latency at batch 1 on
    one token (no KV cache: the per-layer GEMVs of a decode step, without its attention over a cache: a
    decode-step proxy) and on one whole block (a prefill)."""
    from modelpress.zoo.datasets import load_dataset
    from modelpress.zoo.models import build_model
    from modelpress.zoo.pylm import TESTBEDS as LM
    from modelpress.zoo.pylm import model_dir

    bed = LM[model]
    bundle = load_dataset(f"{bed.dataset}?eval_blocks={eval_blocks or 0}", seed=seed)
    dense = build_model(model).eval()
    calib = list(itertools.islice(bundle.train, calibration_batches))
    ids = calib[0]["input_ids"][:1]

    def evaluate(m) -> dict[str, float]:
        with torch.no_grad():
            q = bundle.evaluate(m)
        return {"perplexity": q["perplexity"], "token accuracy": q["token_accuracy"]}

    block = ids.shape[1]
    tb = Testbed(model, dense, calib, {"input_ids": ids}, evaluate, workdir, hf_dir=model_dir(bed), hf_module="hf",
                 timed={"1 token (decode-step proxy)": {"input_ids": ids[:, :1]},
                        f"{block}-token prefill": {"input_ids": ids}},
                 task=bundle.task,
                 notes=f"{sum(p.numel() for p in dense.parameters()):,} parameters; {len(bundle.test)} held-out "
                       f"blocks of {block} tokens; calibration {len(calib)} batches of "
                       f"{tuple(calib[0]['input_ids'].shape)}")
    tb._cache["bundle"] = bundle
    return tb


TESTBEDS = {"minilm": minilm_testbed, "tiny-llama": tiny_llama_testbed, "pylm": pylm_testbed,
            "pylm-tiny": lambda workdir, **kw: pylm_testbed(workdir, "pylm-tiny", **kw)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", choices=sorted(TESTBEDS), default="minilm")
    ap.add_argument("--peers", default="", help="comma-separated keys (default: all; --list shows them)")
    ap.add_argument("--list", action="store_true", help="print the peer keys and exit")
    ap.add_argument("--quick", action="store_true", help=f"peers {','.join(QUICK)}, fewer timings")
    ap.add_argument("--workdir", default="", help="keep the files here (default: a temporary folder)")
    args = ap.parse_args()
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in PEER_LABELS.items()))
        return
    peers = [p for p in args.peers.split(",") if p] or (list(QUICK) if args.quick else list(PEERS))
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        ap.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mp-llm-peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    tb = TESTBEDS[args.testbed](workdir)
    s = Settings(repeats=10 if args.quick else 20)
    rows = peer_rows(tb, s, peers)
    print_table(rows, f"{tb.name}: {tb.notes}")
    print("\n" + ", ".join(f"{k} {v}" for k, v in peer_versions().items())
          + f"; {os.cpu_count()} CPU cores, load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at "
          f"the end; {time.perf_counter() - t0:.0f} s; files in {workdir}")


if __name__ == "__main__":
    main()
