"""Runtimes as plug-ins: one interface to load a deployed file, feed it, run it and time it.

A :class:`Runtime` opens a file it can run as a :class:`Session`; ``session.feeds(inputs)``
converts inputs in the batch convention (a tensor, a tuple, a dict of tensors) once, and
``session.invoke(feeds)`` is the call that gets timed. A :class:`Deployed` names a file *and* the
runtime to run it in: the same ``.onnx`` file runs in ONNX Runtime or in OpenVINO, and they are
different deployables. A plain path picks the runtime from its suffix (``.onnx``: ONNX Runtime,
``.tflite``: LiteRT, ``.xml``: OpenVINO IR).

Built in: ``onnxruntime``, ``openvino`` and ``litert`` (:mod:`modelpress.runtime.builtin`); a
runtime of one's own registers with :func:`register_runtime`. Each runtime's package is optional:
``available()`` says whether it is installed, and opening a file without it is a one-line error
naming the pip extra.
"""
from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..core.errors import ConfigError, MissingDependencyError
from ..core.registry import Registry

#: the name of PyTorch itself where runtimes are listed ("eager": the model, not a file)
EAGER = "eager"


class Session(ABC):
    """A deployed file loaded for running: feeds converted once, ``invoke`` timed."""

    threads: int | None = None  # the thread count the runtime was given (None: its default)

    @abstractmethod
    def feeds(self, inputs: Any) -> Any:
        """Runtime-ready inputs for one call (converted once, outside any timing)."""

    @abstractmethod
    def invoke(self, feeds: Any) -> list[np.ndarray]:
        """Run once on ready ``feeds``; the outputs in the model's order."""

    def __call__(self, inputs: Any) -> list[torch.Tensor]:
        """Run on inputs in the batch convention; the outputs as float tensors."""
        return [torch.from_numpy(np.asarray(o)) for o in self.invoke(self.feeds(inputs))]

    def as_module(self) -> torch.nn.Module:
        """The session behind a module call returning its first output, so what evaluates a model
        (a task's metrics, accuracy loops) evaluates the deployed file the same way."""
        return SessionModule(self)


class SessionModule(torch.nn.Module):
    """A :class:`Session` called like the model it was exported from (first output only)."""

    def __init__(self, session: Session):
        super().__init__()
        self.session = session

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        inputs = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        return self.session(inputs)[0]


class Runtime(ABC):
    """A runtime that runs deployed files. ``name`` is what users type (``--runtime NAME``),
    ``key`` the short prefix of its report columns (``ort_b1_ms``), ``label`` its display name,
    ``module`` the package it needs and ``extra`` the pip extra that installs it."""

    name: ClassVar[str]
    key: ClassVar[str]
    label: ClassVar[str]
    module: ClassVar[str]
    extra: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]  # files it runs; the first is the one it is chosen by

    def available(self) -> bool:
        """True when the runtime's package is installed (nothing is imported to find out)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def require(self) -> None:
        if not self.available():
            raise MissingDependencyError(f"the {self.label} runtime is not installed ({self.module})",
                                         hint=f"install it with: pip install 'modelpress[{self.extra}]'")

    def open(self, path: str | os.PathLike, threads: int | None = 1) -> Session:
        """Load ``path`` for running with ``threads`` intra-op threads (None: the runtime's default)."""
        if Path(path).suffix not in self.suffixes:
            raise ConfigError(f"{self.label} does not run {Path(path).name} ({Path(path).suffix or 'no suffix'})",
                              hint=f"{self.label} runs {', '.join(self.suffixes)} files")
        self.require()
        return self._open(Path(path), threads)

    @abstractmethod
    def _open(self, path: Path, threads: int | None) -> Session:
        ...

    @abstractmethod
    def build(self, model: torch.nn.Module, example_inputs: Any, folder: Path) -> Path:
        """Write ``model`` as the file this runtime runs (the ONNX runtimes: what it deploys as, int8
        included) into ``folder``, checked against the model; what
        :func:`~modelpress.analysis.analyze.analyze` times the model with."""


RUNTIMES: Registry[Runtime] = Registry("runtime", plugins=("modelpress.runtime.builtin",))


def register_runtime(runtime: Runtime) -> Runtime:
    return RUNTIMES.register(runtime.name, runtime)


def get_runtime(name: str) -> Runtime:
    return RUNTIMES.get(name)


def runtime_names() -> list[str]:
    return sorted(name for name, _ in RUNTIMES.items())


def available_runtimes() -> list[str]:
    """Names of the registered runtimes whose package is installed here."""
    return [name for name, rt in sorted(RUNTIMES.items()) if rt.available()]


def key_of(engine: str) -> str:
    """Report-column prefix of a runtime (``eager`` for PyTorch)."""
    return EAGER if engine == EAGER else get_runtime(engine).key


def label_of(engine: str) -> str:
    if engine == EAGER:
        return "PyTorch eager"
    try:
        return get_runtime(engine).label
    except ConfigError:
        return engine


@dataclass(frozen=True)
class Deployed:
    """A deployed file and the runtime that runs it (``Deployed("m.onnx", "openvino")``)."""

    path: Path
    runtime: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        get_runtime(self.runtime)  # an unknown name fails here, in one line

    def open(self, threads: int | None = 1) -> Session:
        return get_runtime(self.runtime).open(self.path, threads)


def runtime_for_suffix(path: str | os.PathLike) -> str | None:
    """The runtime chosen by a file's suffix: the one listing it first."""
    suffix = Path(path).suffix
    return next((name for name, rt in sorted(RUNTIMES.items()) if rt.suffixes[0] == suffix), None)


def as_deployed(target: Any) -> Deployed | None:
    """``target`` as a :class:`Deployed` (a path picks its runtime by suffix); None for anything else
    (a model, a callable)."""
    if isinstance(target, Deployed):
        return target
    if isinstance(target, (str, os.PathLike)):
        runtime = runtime_for_suffix(target)
        return Deployed(Path(target), runtime) if runtime else None
    return None
