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
from ..export.onnx import check_onnx, export_onnx
from ..nn.macs import count_macs
from .latency import check_memory, compare_latency, measure_latency
from .memory import peak_memory
from .params import count_params, dense_bytes


@dataclass
class AnalysisReport:
    """Sizes, compute, memory and latency of one model. ``to_dict()`` is JSON-able.

    MACs are per sample (measured on a batch of one). ``latency`` holds one entry per engine
    and batch size: ``{"engine": "eager" | "onnxruntime", "batch_size": n, "median_ms": ...}``
    with the fields of :class:`~modelpress.analysis.latency.LatencyStats`.
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
        as ``eager_b{N}_ms`` / ``ort_b{N}_ms``. Missing measurements are left out."""
        row = {"params": self.params_total, "nonzero": self.params_nonzero,
               "dense_bytes": self.dense_bytes, "artifact_bytes": self.artifact_bytes,
               "macs": self.macs_total, "effective_macs": self.macs_effective,
               "peak_bytes": self.memory.get("peak_total_bytes")}
        for entry in self.latency:
            prefix = "eager" if entry["engine"] == "eager" else "ort"
            row[f"{prefix}_b{entry['batch_size']}_ms"] = entry["median_ms"]
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
            warmup: int = 3, max_time_s: float | None = 10.0) -> AnalysisReport:
    """Measure ``model`` on ``example_inputs`` (any batch size; resized to each of ``batch_sizes``).

    ``artifact_bytes``: size of the compressed artifact, as an int or a path to the file.
    ``threads``: intra-op threads for eager and ONNX Runtime timings (1 = single-core numbers).
    ``max_time_s`` caps each latency measurement. ONNX is exported to a temporary file that is
    deleted afterwards; its size and its max abs difference to PyTorch are reported.
    """
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
            _measure(model, example_inputs, onnx_path, batch_sizes, threads, repeats, warmup,
                     max_time_s, report)
    return report


def _export(model, example_inputs, path: Path, report: AnalysisReport) -> Path | None:

    try:
        check_memory([model], resize_batch(example_inputs, 1), onnx=True, what="the ONNX export")
        export_onnx(model, example_inputs, path)
        report.onnx_bytes = path.stat().st_size
    except Exception as exc:  # noqa: BLE001
        report.errors["onnx"] = _error(exc)
        return None
    try:  # a different batch size than the export example catches shapes baked in by tracing
        check_batch = batch_size_of(example_inputs) + 1
        report.onnx_max_abs_diff = check_onnx(path, model, resize_batch(example_inputs, check_batch),
                                              atol=1e-3, relative=True)
    except Exception as exc:  # noqa: BLE001 - the file still runs; say it disagrees
        report.errors["onnx_check"] = _error(exc)
    return path


def _measure(model, example_inputs, onnx_path, batch_sizes, threads, repeats, warmup,
             max_time_s, report: AnalysisReport) -> None:
    for bs in batch_sizes:
        inputs = resize_batch(example_inputs, bs)
        measured = []
        if onnx_path is not None:
            try:  # interleaved, so the eager/ORT ratio is not biased by drift between two runs
                cmp = compare_latency(model, str(onnx_path), inputs, warmup=warmup, repeats=repeats,
                                      threads=threads, max_time_s=max_time_s)
                measured = [("eager", cmp.a), ("onnxruntime", cmp.b)]
            except Exception as exc:  # noqa: BLE001 - fall back to eager alone
                report.errors[f"latency_onnxruntime_bs{bs}"] = _error(exc)
        if not measured:
            try:
                measured = [("eager", measure_latency(model, inputs, warmup=warmup, repeats=repeats,
                                                      threads=threads, max_time_s=max_time_s))]
            except Exception as exc:  # noqa: BLE001
                report.errors[f"latency_eager_bs{bs}"] = _error(exc)
        for engine, stats in measured:
            report.latency.append({"engine": engine, **stats.to_dict()})


def compare_models(baseline: nn.Module, model: nn.Module, example_inputs: Any, *,
                   batch_sizes: tuple[int, ...] = (1, 64), threads: int | None = 1, onnx: bool = True,
                   repeats: int = 20, warmup: int = 3, max_time_s: float | None = 10.0,
                   example_inputs_baseline: Any = None) -> dict[str, float]:
    """Speed-up of ``model`` over ``baseline`` (baseline median / model median), timed
    interleaved in this process for eager PyTorch and ONNX Runtime at each batch size.

    Keys: ``eager_b{N}_ms`` / ``ort_b{N}_ms`` (the model's medians) and
    ``eager_b{N}_speedup`` / ``ort_b{N}_speedup``. Two separately timed runs would let load
    changes on the machine pass for speed-ups; interleaving cancels them.
    """

    base_inputs = example_inputs if example_inputs_baseline is None else example_inputs_baseline
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="modelpress-compare-") as tmp:
        paths = None
        if onnx:
            try:
                paths = (export_onnx(baseline, base_inputs, Path(tmp) / "a.onnx"),
                         export_onnx(model, example_inputs, Path(tmp) / "b.onnx"))
            except Exception:  # noqa: BLE001 - eager numbers are still worth having
                paths = None
        for bs in batch_sizes:
            pairs = [("eager", baseline, model)]
            if paths:
                pairs.append(("ort", str(paths[0]), str(paths[1])))
            for engine, a, b in pairs:
                cmp = compare_latency(a, b, resize_batch(base_inputs, bs), inputs_b=resize_batch(example_inputs, bs),
                                      warmup=warmup, repeats=repeats, threads=threads, max_time_s=max_time_s)
                out[f"{engine}_b{bs}_ms"] = cmp.b.median_ms
                out[f"{engine}_b{bs}_speedup"] = cmp.ratio
    return out
