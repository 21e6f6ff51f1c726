"""One call that measures everything modelpress reports about a model.

``analyze`` does not modify the model (it runs it in eval mode and restores the training flag).
Each part (MACs, memory, ONNX export, latency) that fails is recorded in ``report.errors`` with
its reason, so one unsupported op does not hide the other numbers; only a model that cannot run
on its example input at all raises.

Example::

    >>> import torch
    >>> from torch import nn
    >>> report = analyze(nn.Linear(16, 4), torch.randn(2, 16), batch_sizes=(1,), repeats=3)
    >>> report.params_total, report.macs_total
    (68, 64)
    >>> sorted(e["engine"] for e in report.latency)
    ['eager', 'onnxruntime']
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.data import batch_size_of, call_model
from ..core.errors import DataError
from ..export.deploy import export_deployable, exporter_for
from ..export.onnx import check_onnx
from ..nn.macs import count_macs
from ..runtime import Deployed, get_runtime, key_of
from .latency import check_memory, compare_latency, measure_latency, measure_together
from .memory import peak_memory
from .params import count_params, dense_bytes


@dataclass
class AnalysisReport:
    """Sizes, compute, memory and latency of one model. ``to_dict()`` is JSON-able.

    MACs are per sample (measured on a batch of one). ``latency`` holds one entry per engine
    and batch size: ``{"engine": "eager" | "onnxruntime" | "openvino" | "litert", "batch_size": n,
    "median_ms": ...}`` with the fields of :class:`~modelpress.analysis.latency.LatencyStats`.
    """

    model: str
    params_total: int
    params_nonzero: int
    dense_bytes: int
    artifact_bytes: int | None = None
    macs_total: int | None = None
    macs_effective: int | None = None
    macs_by_layer: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    memory_batch_size: int | None = None
    onnx_bytes: int | None = None
    onnx_max_abs_diff: float | None = None
    latency: list[dict[str, Any]] = field(default_factory=list)
    threads: int | None = None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.params_nonzero / self.params_total if self.params_total else 0.0

    def latency_ms(self, engine: str, batch_size: int) -> float | None:
        """Median latency for ``engine`` at ``batch_size`` (None when not measured)."""
        for entry in self.latency:
            if entry["engine"] == engine and entry["batch_size"] == batch_size:
                return entry["median_ms"]
        return None

    def summary(self) -> dict[str, Any]:
        """Flat row for before/after tables (``compare_rows``): sizes, MACs, median latencies
        as ``{key}_b{N}_ms`` (``eager``, ``ort``, ``ov``, ``litert``). Missing measurements are left out."""
        row = {"params": self.params_total, "nonzero": self.params_nonzero,
               "dense_bytes": self.dense_bytes, "artifact_bytes": self.artifact_bytes,
               "macs": self.macs_total, "effective_macs": self.macs_effective,
               "peak_bytes": self.memory.get("peak_total_bytes")}
        for entry in self.latency:
            row[f"{key_of(entry['engine'])}_b{entry['batch_size']}_ms"] = entry["median_ms"]
        return {k: v for k, v in row.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, in sections: ``{"model", "threads", "params": {"total", "nonzero",
        "sparsity"}, "size": {...}, "macs": {...}, "memory": {...}, "onnx": {...},
        "latency": [...], "errors": {...}}``."""
        return {
            "model": self.model, "threads": self.threads,
            "params": {"total": self.params_total, "nonzero": self.params_nonzero,
                       "sparsity": self.sparsity},
            "size": {"dense_bytes": self.dense_bytes, "artifact_bytes": self.artifact_bytes},
            "macs": {"total": self.macs_total, "effective": self.macs_effective,
                     "by_layer": dict(self.macs_by_layer)},
            "memory": {**self.memory, "batch_size": self.memory_batch_size},
            "onnx": {"bytes": self.onnx_bytes, "max_abs_diff": self.onnx_max_abs_diff},
            "latency": [dict(e) for e in self.latency],
            "errors": dict(self.errors),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalysisReport":
        """Inverse of :meth:`to_dict` (e.g. on a report read back from JSON)."""
        memory = {k: v for k, v in data["memory"].items() if k != "batch_size"}
        return cls(model=data["model"], threads=data.get("threads"),
                   params_total=data["params"]["total"], params_nonzero=data["params"]["nonzero"],
                   dense_bytes=data["size"]["dense_bytes"],
                   artifact_bytes=data["size"].get("artifact_bytes"),
                   macs_total=data["macs"].get("total"), macs_effective=data["macs"].get("effective"),
                   macs_by_layer=dict(data["macs"].get("by_layer", {})),
                   memory=memory, memory_batch_size=data["memory"].get("batch_size"),
                   onnx_bytes=data["onnx"].get("bytes"), onnx_max_abs_diff=data["onnx"].get("max_abs_diff"),
                   latency=[dict(e) for e in data.get("latency", [])], errors=dict(data.get("errors", {})))


def resize_batch(inputs: Any, n: int) -> Any:
    """``inputs`` with ``n`` samples along dim 0: sliced, or repeated cyclically when too few."""
    if isinstance(inputs, dict):
        return {k: resize_batch(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(resize_batch(v, n) for v in inputs)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        return inputs
    have = inputs.shape[0]
    if have >= n:
        return inputs[:n]
    reps = math.ceil(n / have)
    return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:n]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _artifact_size(artifact: int | str | os.PathLike | None) -> int | None:
    if artifact is None or isinstance(artifact, int):
        return artifact
    return os.path.getsize(artifact)


def analyze(model: nn.Module, example_inputs: Any, *, batch_sizes: tuple[int, ...] = (1, 64),
            threads: int | None = 1, latency: bool = True, onnx: bool = True,
            artifact_bytes: int | str | os.PathLike | None = None, repeats: int = 20,
            warmup: int = 3, max_time_s: float | None = 10.0,
            runtimes: tuple[str, ...] = ("onnxruntime",)) -> AnalysisReport:
    """Measure ``model`` on ``example_inputs`` (any batch size; resized to each of ``batch_sizes``).

    ``artifact_bytes``: size of the compressed artifact, as an int or a path to the file.
    ``threads``: intra-op threads for eager and runtime timings (1 = single-core numbers).
    ``max_time_s`` caps each latency measurement. ONNX is exported to a temporary file that is
    deleted afterwards; its size and its max abs difference to PyTorch are reported.
    ``runtimes``: the runtimes (:mod:`modelpress.runtime`) the model is timed in besides eager
    PyTorch, each on a float file it runs, all interleaved with eager at each batch size. Runtimes
    reading ONNX need ``onnx=True``; LiteRT files run batch 1 only. A runtime that is not
    installed or cannot take the model is recorded in ``report.errors``.
    """
    for name in runtimes:
        get_runtime(name)  # an unknown name is a one-line error before any work
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                call_model(model, resize_batch(example_inputs, 1))
            finally:
                model.train(was_training)
    except Exception as exc:
        raise DataError(
            f"analyze: {type(model).__name__} cannot run on example_inputs ({_error(exc)})",
            hint="pass inputs in the batch convention: a tensor, a tuple or a dict of keyword tensors",
        ) from exc

    counts = count_params(model)
    report = AnalysisReport(model=type(model).__name__, params_total=counts["total"],
                            params_nonzero=counts["nonzero"], dense_bytes=dense_bytes(model),
                            artifact_bytes=_artifact_size(artifact_bytes), threads=threads)
    try:
        macs = count_macs(model, resize_batch(example_inputs, 1))
        report.macs_total, report.macs_effective = macs.total, macs.effective_total
        report.macs_by_layer = dict(macs.by_layer)
        if macs.uncounted_ops:
            report.errors["macs"] = ("ops without a MAC formula were not counted: "
                                     f"{sorted(macs.uncounted_ops)}")
    except Exception as exc:  # noqa: BLE001 - recorded, the other parts still run
        report.errors["macs"] = _error(exc)

    memory_bs = max(batch_sizes) if batch_sizes else batch_size_of(example_inputs)
    try:
        check_memory([model], resize_batch(example_inputs, memory_bs), what="the peak-memory measurement")
        report.memory = peak_memory(model, resize_batch(example_inputs, memory_bs))
        report.memory_batch_size = memory_bs
    except Exception as exc:  # noqa: BLE001
        report.errors["memory"] = _error(exc)

    with tempfile.TemporaryDirectory(prefix="modelpress-analyze-") as tmp:
        onnx_path = _export(model, example_inputs, Path(tmp) / "model.onnx", report) if onnx else None
        if latency:
            files = deployables(model, example_inputs, runtimes, Path(tmp), report.errors,
                                onnx_ok=onnx_path is not None)
            _measure(model, example_inputs, files, batch_sizes, threads, repeats, warmup, max_time_s, report)
    return report


def deployables(model: nn.Module, example_inputs: Any, runtimes: tuple[str, ...], folder: Path,
                errors: dict[str, str], *, onnx_ok: bool = True) -> dict[str, Deployed]:
    """``{runtime: Deployed}``: ``model`` as a float file each runtime runs, written in ``folder``;
    what fails (not installed, not convertible) goes to ``errors`` as ``latency_{runtime}``."""
    files = {}
    for name in runtimes:
        runtime = get_runtime(name)
        if not runtime.available():
            errors[f"latency_{name}"] = f"not installed: pip install 'modelpress[{runtime.extra}]'"
            continue
        if ".onnx" in runtime.suffixes and not onnx_ok:
            continue  # no ONNX file (onnx=False, or the export failed and says why)
        try:
            check_memory([model], resize_batch(example_inputs, 1), onnx=True, what=f"the {runtime.label} file")
            files[name] = Deployed(runtime.build(model, example_inputs, folder), name)
        except Exception as exc:  # noqa: BLE001 - recorded, the other runtimes still run
            errors[f"latency_{name}"] = _error(exc)
    return files


def _export(model, example_inputs, path: Path, report: AnalysisReport) -> Path | None:
    """The ONNX file the model deploys as (:func:`~modelpress.export.deploy.export_deployable`: int8 QDQ
    for a statically quantized model, ONNX Runtime dynamic int8, MatMulNBits), so its size and the
    runtimes' latency are those of what would ship, checked by its exporter; a float model's file is
    also checked at another batch size."""
    try:
        check_memory([model], resize_batch(example_inputs, 1), onnx=True, what="the ONNX export")
        export_deployable(model, example_inputs, path)
        report.onnx_bytes = path.stat().st_size
    except Exception as exc:  # noqa: BLE001
        report.errors["onnx"] = _error(exc)
        return None
    if exporter_for(model) is not None:
        return path  # its exporter compared it with PyTorch, with the tolerance its rounding needs
    try:  # a different batch size than the export example catches shapes baked in by tracing
        check_batch = batch_size_of(example_inputs) + 1
        report.onnx_max_abs_diff = check_onnx(path, model, resize_batch(example_inputs, check_batch),
                                              atol=1e-3, relative=True)
    except Exception as exc:  # noqa: BLE001 - the file still runs; say it disagrees
        report.errors["onnx_check"] = _error(exc)
    return path


def _measure(model, example_inputs, files: dict[str, Deployed], batch_sizes, threads, repeats, warmup,
             max_time_s, report: AnalysisReport) -> None:
    for bs in batch_sizes:
        inputs = resize_batch(example_inputs, bs)
        targets: dict[str, Any] = {"eager": model}
        for name, deployed in files.items():
            if name == "litert" and bs != 1:
                report.errors.setdefault("latency_litert", "LiteRT files take batch 1: timed at batch 1 only")
                continue
            targets[name] = deployed
        try:  # interleaved, so the ratios between runtimes are not biased by drift between runs
            measured = measure_together(targets, inputs, warmup=warmup, repeats=repeats, threads=threads,
                                        max_time_s=max_time_s)
        except Exception:  # noqa: BLE001 - one at a time, so one failing runtime hides nothing else
            measured = {}
            for name, target in targets.items():
                try:
                    measured[name] = measure_latency(target, inputs, warmup=warmup, repeats=repeats,
                                                     threads=threads, max_time_s=max_time_s)
                except Exception as exc:  # noqa: BLE001
                    report.errors[f"latency_{name}_bs{bs}"] = _error(exc)
        for engine, stats in measured.items():
            report.latency.append({"engine": engine, **stats.to_dict()})


def compare_models(baseline: nn.Module, model: nn.Module, example_inputs: Any, *,
                   batch_sizes: tuple[int, ...] = (1, 64), threads: int | None = 1, onnx: bool = True,
                   repeats: int = 20, warmup: int = 3, max_time_s: float | None = 10.0,
                   example_inputs_baseline: Any = None,
                   runtimes: tuple[str, ...] = ("onnxruntime",)) -> dict[str, float]:
    """Speed-up of ``model`` over ``baseline`` (baseline median / model median), timed
    interleaved in this process for eager PyTorch and each of ``runtimes`` at each batch size.

    Keys: ``{key}_b{N}_ms`` (the model's medians) and ``{key}_b{N}_speedup``, with ``key`` eager,
    ort (ONNX Runtime), ov (OpenVINO) or litert (batch 1 only). Two separately timed runs would let
    load changes on the machine pass for speed-ups; interleaving cancels them. A runtime that
    cannot take either model is left out.
    """

    base_inputs = example_inputs if example_inputs_baseline is None else example_inputs_baseline
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="modelpress-compare-") as tmp:
        (Path(tmp) / "a").mkdir(), (Path(tmp) / "b").mkdir()
        errors: dict[str, str] = {}
        chosen = runtimes if onnx else tuple(r for r in runtimes if ".onnx" not in get_runtime(r).suffixes)
        files_a = deployables(baseline, base_inputs, chosen, Path(tmp) / "a", errors)
        files_b = deployables(model, example_inputs, chosen, Path(tmp) / "b", errors)
        for bs in batch_sizes:
            pairs = [("eager", baseline, model)]
            pairs += [(name, files_a[name], files_b[name]) for name in chosen if name in files_a and name in files_b]
            out.update(_compare_pairs(pairs, bs, base_inputs, example_inputs, warmup, repeats, threads, max_time_s))
    return out


def _compare_pairs(pairs, bs: int, inputs_a: Any, inputs_b: Any, warmup: int, repeats: int, threads: int | None,
                   max_time_s: float | None) -> dict[str, float]:
    """``{key}_b{bs}_ms`` / ``_speedup`` of each ``(engine, a, b)`` pair, timed interleaved (LiteRT: batch 1)."""
    out: dict[str, float] = {}
    for engine, a, b in pairs:
        if engine == "litert" and bs != 1:
            continue
        cmp = compare_latency(a, b, resize_batch(inputs_a, bs), inputs_b=resize_batch(inputs_b, bs),
                              warmup=warmup, repeats=repeats, threads=threads, max_time_s=max_time_s)
        out[f"{key_of(engine)}_b{bs}_ms"] = cmp.b.median_ms
        out[f"{key_of(engine)}_b{bs}_speedup"] = cmp.ratio
    return out


def compare_deployed(baseline: nn.Module, deployed: Deployed, example_inputs: Any, *,
                     batch_sizes: tuple[int, ...] = (1, 64), threads: int | None = 1, repeats: int = 20,
                     warmup: int = 3, max_time_s: float | None = 10.0) -> dict[str, float]:
    """Speed-up of a deployed file over ``baseline``'s float file in the same runtime (interleaved):
    keys as :func:`compare_models`' for that runtime. Empty when the baseline cannot be built for it."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="modelpress-compare-") as tmp:
        files = deployables(baseline, example_inputs, (deployed.runtime,), Path(tmp), {})
        if deployed.runtime in files:
            for bs in batch_sizes:
                out.update(_compare_pairs([(deployed.runtime, files[deployed.runtime], deployed)], bs, example_inputs,
                                          example_inputs, warmup, repeats, threads, max_time_s))
    return out
