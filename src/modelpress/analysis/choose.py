"""``--runtime auto``: build the deployables a model allows, measure them here, keep the fastest good one.

Which runtime and precision is fastest depends on the machine (on an AVX2 CPU without VNNI, ONNX
Runtime's int8 kernels are slower than its fp32 while OpenVINO's int8 is faster) and on the
model, so it is measured, not assumed:

1. **Candidates**, for every runtime installed here (:mod:`modelpress.runtime`): the model as it
   is (fp32, or the int8 QDQ / weight-only file its quantization exports to) in ONNX Runtime and in
   OpenVINO; for a float model also static int8 (``quant.static_int8`` calibrated on the training
   split, exported as QDQ) in both, once whole and once with the first and last layer kept in
   fp32 (a 1-channel stem and a small head are where int8 kernels lose most); the float IR computed
   in bf16 by OpenVINO on CPUs with native bf16 (``openvino-bf16``); in LiteRT fp32
   and int8 calibrated on the same split (batch 1); and the model as it is compiled by
   ``torch.compile`` (a ``torch.export`` program, ``.pt2``; Inductor needs a C++ compiler).
2. **Quality**: every candidate file is evaluated by the task on the test split, like the PyTorch
   model (accuracy, Spearman, perplexity ...). A candidate passes when its primary metric is within
   ``max_drop`` points of the PyTorch model's (:meth:`~modelpress.tasks.base.Task.points`).
3. **Speed**: every candidate and the PyTorch model are timed in turns, call by call, in this
   process (:func:`~modelpress.analysis.latency.measure_together`) at ``batch_size`` (LiteRT at
   batch 1 only: it is a candidate only when ``batch_size`` is 1) with ``threads`` threads.
4. **Choice**: the fastest candidate that passes (among those within ``same_speed``, 3%, of it:
   timing noise, the smallest file). A float candidate always competes, so the choice is never
   slower than the fastest float file by more than that; the chosen file is copied to ``dest`` with its
   runtime's suffix, and the table of all candidates says why.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import ConfigError, ModelpressError
from ..core.progress import log
from ..core.scope import first_and_last
from ..engine import MethodInputs, run_method
from ..export.deploy import export_deployable, exporter_for
from ..export.openvino import onnx_to_ir
from ..export.tflite import TfliteOptions
from ..quantization.static import StaticInt8
from ..runtime import Deployed, available_runtimes, get_runtime
from .analyze import resize_batch
from .latency import measure_together

AUTO_RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16", "litert", "torch-compile")


@dataclass
class Candidate:
    """One deployable: a file, the runtime it runs in, and what was measured."""

    runtime: str
    precision: str
    path: Path
    bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    drop: float | None = None  # points below the PyTorch model (positive: worse)
    ms: float | None = None
    passed: bool = False
    note: str = ""

    @property
    def name(self) -> str:
        return f"{get_runtime(self.runtime).label} {self.precision}"


@dataclass
class Choice:
    """The chosen candidate (written to ``path``), every candidate, and the PyTorch model's numbers."""

    chosen: Candidate
    path: Path
    candidates: list[Candidate]
    reference: dict[str, float]
    reference_ms: float | None
    primary: str
    batch_size: int
    threads: int | None

    def table(self) -> str:
        """Markdown: one row per candidate and one for PyTorch, the chosen one in bold."""
        fast_float = min((c.ms for c in self.candidates if c.precision == "fp32" and c.ms), default=None)
        lines = [f"| deployable | {self.primary} | drop (pt) | bytes | ms (batch {self.batch_size}, "
                 f"{self.threads or 'default'} thr) | x vs fastest fp32 | passes | note |",
                 "|---|--:|--:|--:|--:|--:|---|---|"]
        ref = self.reference.get(self.primary)
        lines.append(f"| PyTorch eager (the model) | {_fmt(ref)} | - | - | {_ms(self.reference_ms)} | "
                     f"{_x(fast_float, self.reference_ms)} | reference | |")
        for c in self.candidates:
            name = f"**{c.name}**" if c is self.chosen else c.name
            lines.append(f"| {name} | {_fmt(c.metrics.get(self.primary))} | "
                         f"{'-' if c.drop is None else f'{c.drop:+.2f}'} | {c.bytes:,} | {_ms(c.ms)} | "
                         f"{_x(fast_float, c.ms)} | {'yes' if c.passed else 'no'} | {c.note} |")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _x(base: float | None, v: float | None) -> str:
    return "-" if not base or not v else f"{base / v:.2f}x"


def _file_bytes(path: Path) -> int:
    extra = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (extra.stat().st_size if extra and extra.exists() else 0)


def _builders(model: nn.Module, bundle: Any, runtimes: tuple[str, ...], folder: Path,
              batch_size: int) -> list[tuple[str, str, Callable[[], Path]]]:
    """``(runtime, precision, build)`` for every candidate the model and the runtimes allow."""
    example = bundle.example_inputs(min(8, max(2, batch_size)))
    as_is = "fp32" if exporter_for(model) is None else "as quantized"
    onnx_files: dict[str, Path] = {}

    def onnx(kind: str) -> Path:  # written once, run by ONNX Runtime and OpenVINO
        if kind not in onnx_files:
            m = model
            if kind == "int8":
                m = run_method(model, StaticInt8(), MethodInputs(data=bundle.train))[0].eval()
            elif kind == "int8-ends":  # the stem and the head are where int8 kernels lose most (few channels)
                ends = first_and_last(model, ("Linear", "Conv2d"))
                m = run_method(model, StaticInt8(scope={"exclude": ends}), MethodInputs(data=bundle.train))[0].eval()
            onnx_files[kind], _ = export_deployable(m, example, folder / f"{kind}.onnx")
        return onnx_files[kind]

    def ir(kind: str) -> Path:
        return onnx_to_ir(onnx(kind), folder / f"{kind}.xml")

    def tflite(precision: str) -> Path:
        path, _ = export_deployable(model, resize_batch(example, 1), folder / f"{precision}.tflite", fmt="tflite",
                                    tflite=TfliteOptions(precision=precision), calibration=bundle.train)
        return path

    kinds = [("fp32", as_is)] + ([("int8", "int8"), ("int8-ends", "int8, first/last layer fp32")]
                                 if as_is == "fp32" else [])
    out = []
    for name in runtimes:
        if name == "onnxruntime":
            out += [(name, label, lambda k=k: onnx(k)) for k, label in kinds]
        elif name == "openvino":
            out += [(name, label, lambda k=k: ir(k)) for k, label in kinds]
        elif name == "openvino-bf16" and as_is == "fp32":  # the float file, computed in bf16
            out.append((name, "fp32 file", lambda: ir("fp32")))
        elif name == "litert" and batch_size == 1:
            out += [(name, p, lambda p=p: tflite(p)) for p in ("fp32", "int8")]
        elif name == "torch-compile":  # the model as it is, compiled by Inductor when opened
            out.append((name, as_is, lambda: export_deployable(model, example, folder / "model.pt2", fmt="pt2")[0]))
    return out


def choose_deployable(model: nn.Module, bundle: Any, dest: str | os.PathLike, *,
                      runtimes: tuple[str, ...] | None = None, batch_size: int = 1, threads: int | None = 1,
                      max_drop: float = 0.5, same_speed: float = 0.03, repeats: int = 50, warmup: int = 10,
                      max_time_s: float | None = 60.0) -> Choice:
    """Build, check and time the deployables of ``model`` (see the module docstring); write the
    fastest that keeps quality within ``max_drop`` points to ``dest`` (its suffix becomes the chosen
    runtime's: ``.onnx``, ``.xml`` + ``.bin``, ``.tflite``, ``.pt2``) and return the :class:`Choice`. Candidates
    within ``same_speed`` (a fraction) of the fastest count as equally fast: the smallest file wins."""
    wanted = tuple(runtimes) if runtimes else AUTO_RUNTIMES
    for name in wanted:
        get_runtime(name)  # an unknown name fails before any work
    usable = tuple(n for n in wanted if n in available_runtimes())
    if not usable:
        raise ConfigError(f"none of the runtimes {list(wanted)} is installed",
                          hint="pip install 'modelpress[openvino]' (or [tflite]); onnxruntime comes with modelpress")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    model = model.eval()
    task = bundle.task
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        reference = bundle.evaluate(model)
    ref_points = task.points(reference)
    candidates: list[Candidate] = []
    with tempfile.TemporaryDirectory(prefix=".modelpress-auto-", dir=dest.parent) as tmp:
        folder = Path(tmp)
        builders = _builders(model, bundle, usable, folder, batch_size)
        if not builders:
            raise ConfigError(f"no candidate at batch size {batch_size}: {', '.join(usable)} "
                              f"{'takes' if len(usable) == 1 else 'take'} batch 1 files only",
                              hint="use --batch-size 1, or add onnxruntime / openvino")
        for runtime, precision, build in builders:
            log(f"auto: building and checking {get_runtime(runtime).label} {precision} ...")
            try:
                path = build()
                session = Deployed(path, runtime).open(threads)
                with torch.no_grad():
                    metrics = bundle.evaluate(session.as_module(), reference=model)
            except Exception as exc:  # noqa: BLE001 - a runtime failing on this model is a result: left out
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                log(f"auto: {get_runtime(runtime).label} {precision} left out: {first}")
                continue
            drop = ref_points - task.points(metrics)
            candidates.append(Candidate(runtime, precision, path, _file_bytes(path), metrics, drop,
                                        passed=drop <= max_drop + 1e-9))
        if not candidates:
            raise ModelpressError("no runtime could run the model", hint="export to ONNX (-o model.onnx) and check "
                                                                         "the error it gives")
        inputs = resize_batch(bundle.example_inputs(batch_size), batch_size)
        log(f"auto: timing {len(candidates)} deployables and the PyTorch model in turns ...")
        targets: dict[str, Any] = {"eager": model}
        targets.update({str(i): Deployed(c.path, c.runtime) for i, c in enumerate(candidates)})
        stats = measure_together(targets, inputs, warmup=warmup, repeats=repeats, threads=threads,
                                 max_time_s=max_time_s)
        for i, c in enumerate(candidates):
            c.ms = stats[str(i)].median_ms
        fast_float = min((c for c in candidates if c.precision == "fp32"), key=lambda c: c.ms, default=None)
        passing = [c for c in candidates if c.passed]
        if passing:
            fastest = min(passing, key=lambda c: c.ms)
            ties = [c for c in passing if c.ms <= fastest.ms * (1 + same_speed)]
            chosen = min(ties, key=lambda c: (c.bytes, c.ms))  # as fast within noise: the smaller file
            if chosen is not fastest:
                chosen.note = f"within {same_speed:.0%} of the fastest ({fastest.name}) and smaller"
        else:
            chosen = fast_float or candidates[0]
            chosen.note = "nothing kept quality: the fastest float file"
        path = dest.with_suffix(chosen.path.suffix)
        if chosen.path.suffix == ".xml":  # the weights first: an .xml never points at a missing .bin
            os.replace(chosen.path.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(chosen.path, path)  # the work folder is next to dest: one rename, never a partial file
        for c in candidates:  # the temporary folder goes: say where the chosen one is
            c.path = path if c is chosen else Path(c.path.name)
    return Choice(chosen, path, candidates, reference, stats["eager"].median_ms, task.primary, batch_size, threads)
