"""The built-in runtimes: ONNX Runtime (``.onnx``), OpenVINO (``.xml`` IR, and ``.onnx`` read
directly, QDQ int8 included; ``openvino-bf16`` computes in bf16 on CPUs that have it), LiteRT
(``.tflite``) and ``torch-compile`` (a ``torch.export`` program, ``.pt2``, compiled by TorchInductor
when opened). Each imports its package only when a file is opened."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.data import batch_size_of, call_model, slice_inputs
from ..core.errors import MissingDependencyError, ModelLoadError
from ..export.deploy import export_deployable
from ..export.onnx import onnx_inputs, ort_feeds, ort_session
from ..export.tflite import LiteRTRunner, TfliteOptions
from .base import Runtime, Session, register_runtime


class OrtSession(Session):
    def __init__(self, path: Path, threads: int | None):
        # no spinning: idle ORT threads would take the cores from a call timed right after
        self.session = ort_session(path, threads=threads, spinning=False)
        self.threads = threads

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        return ort_feeds(self.session, inputs)

    def invoke(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class OnnxRuntime(Runtime):
    name, key, label, module, extra, suffixes = "onnxruntime", "ort", "ONNX Runtime", "onnxruntime", "onnx", (".onnx",)

    def _open(self, path: Path, threads: int | None) -> Session:
        return OrtSession(path, threads)

    def build(self, model: torch.nn.Module, example_inputs: Any, folder: Path) -> Path:
        return build_onnx(model, example_inputs, folder)


class OpenVinoSession(Session):
    def __init__(self, path: Path, threads: int | None, precision: str | None = None):
        import openvino as ov

        from ..export.openvino import CPU_CONFIG

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, **CPU_CONFIG}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"OpenVINO could not compile {path.name}: {first}",
                                 hint="export the model again (modelpress export), or run it in onnxruntime") from None
        self.request = self.compiled.create_infer_request()
        self.threads = threads

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        from ..export.openvino import feeds_for

        return feeds_for(self.compiled.inputs, onnx_inputs(inputs))

    def invoke(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.asarray(result[out]) for out in self.compiled.outputs]


class OpenVino(Runtime):
    name, key, label, module, extra, suffixes = "openvino", "ov", "OpenVINO", "openvino", "openvino", (".xml", ".onnx")

    def _open(self, path: Path, threads: int | None) -> Session:
        return OpenVinoSession(path, threads)

    def build(self, model: torch.nn.Module, example_inputs: Any, folder: Path) -> Path:
        return build_onnx(model, example_inputs, folder)  # OpenVINO reads ONNX as it is


def _cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class OpenVinoBf16(OpenVino):
    """OpenVINO computing the float parts of a file in bf16: what its CPU plug-in does by default on
    CPUs with native bf16, here a separate runtime so it is measured and its quality checked, never
    taken silently for fp32. Offered only on such CPUs."""

    name, key, label = "openvino-bf16", "ovbf16", "OpenVINO bf16"

    def available(self) -> bool:
        return super().available() and _cpu_has_bf16()

    def _open(self, path: Path, threads: int | None) -> Session:
        return OpenVinoSession(path, threads, precision="bf16")


class LiteRTSession(Session):
    def __init__(self, path: Path, threads: int | None):
        self.threads = threads or 1  # the interpreter's own default is 1 thread
        self.runner = LiteRTRunner(path, threads=self.threads)

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        return self.runner.feeds(inputs, channels_last=self.runner.takes_nhwc(inputs))

    def invoke(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.runner.invoke(feeds)
        return [out[name] for name in self.runner.output_names]

    def __call__(self, inputs: Any) -> list[torch.Tensor]:
        """The outputs as float tensors (an int8 output dequantized with the file's scale and zero point).
        The file takes batch 1: a larger batch runs sample by sample."""
        n = batch_size_of(inputs)
        if n > 1:
            parts = [self(slice_inputs(inputs, 1, start=i)) for i in range(n)]
            return [torch.cat(outs) for outs in zip(*parts)]
        details = self.runner.runner.get_output_details()
        outs = []
        for name, y in zip(self.runner.output_names, self.invoke(self.feeds(inputs))):
            scale, zero = details[name]["quantization"]
            if scale and not np.issubdtype(y.dtype, np.floating):
                y = (y.astype(np.float32) - zero) * scale
            outs.append(torch.from_numpy(np.asarray(y, dtype=np.float32)))
        return outs


class LiteRT(Runtime):
    name, key, label, module, extra, suffixes = "litert", "litert", "LiteRT", "ai_edge_litert", "tflite", (".tflite",)

    def _open(self, path: Path, threads: int | None) -> Session:
        return LiteRTSession(path, threads)

    def build(self, model: torch.nn.Module, example_inputs: Any, folder: Path) -> Path:
        """fp32 ``.tflite`` at batch 1 (the file's input shapes are fixed: it runs batch 1 only); quantized
        layers go in as their float weights."""
        path, _ = export_deployable(model, slice_inputs(example_inputs, 1), folder / "model.tflite", fmt="tflite",
                                    tflite=TfliteOptions(precision="fp32"))
        return path


class CompiledSession(Session):
    """A ``.pt2`` program compiled by ``torch.compile`` (Inductor) for this machine; the first calls
    compile (the warm-up every latency measurement runs before timing)."""

    def __init__(self, path: Path, threads: int | None):
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # not a program torch.export wrote, or a newer PyTorch's
            raise ModelLoadError(f"cannot load {path.name} as a torch.export program: {str(exc)[:200]}",
                                 hint="export it again with modelpress export --runtime torch-compile") from None
        self.module = torch.compile(program.module(), dynamic=False)
        self.threads = threads

    def feeds(self, inputs: Any) -> Any:
        return inputs

    def invoke(self, feeds: Any) -> list[np.ndarray]:
        previous = torch.get_num_threads()
        if self.threads is not None and self.threads != previous:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = call_model(self.module, feeds)
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)
        return [t.detach().cpu().numpy() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


class TorchCompile(Runtime):
    """PyTorch with TorchInductor: the model as a ``torch.export`` program, compiled where it runs."""

    name, key, label, module, extra, suffixes = "torch-compile", "tc", "torch.compile", "torch", "dev", (".pt2",)

    def available(self) -> bool:
        """Inductor writes C++ for the CPU: a C++ compiler must be on the PATH."""
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))

    def require(self) -> None:
        if not self.available():
            raise MissingDependencyError("torch.compile needs a C++ compiler on the PATH (g++ or clang++) to "
                                         "compile for the CPU", hint="install one (e.g. apt-get install g++), or "
                                                                     "use --runtime onnxruntime")

    def _open(self, path: Path, threads: int | None) -> Session:
        return CompiledSession(path, threads)

    def build(self, model: torch.nn.Module, example_inputs: Any, folder: Path) -> Path:
        path, _ = export_deployable(model, example_inputs, folder / "model.pt2", fmt="pt2")
        return path


def build_onnx(model: torch.nn.Module, example_inputs: Any, folder: Path) -> Path:
    """The ONNX file the model deploys as (``model.onnx`` in ``folder``, written once for every runtime
    reading ONNX): fp32, or int8 QDQ / dynamic int8 / MatMulNBits for a quantized model, checked
    against PyTorch by :func:`~modelpress.export.deploy.export_deployable`."""
    path = folder / "model.onnx"
    if not path.exists():
        export_deployable(model, example_inputs, path)
    return path


for _runtime in (OnnxRuntime(), OpenVino(), OpenVinoBf16(), LiteRT(), TorchCompile()):
    register_runtime(_runtime)
