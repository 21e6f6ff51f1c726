"""Wall-clock latency of a model (eager PyTorch) or a deployed file (ONNX Runtime, OpenVINO, LiteRT), fair A/B.

Every "x times faster" claim in modelpress comes from :func:`compare_latency`, which runs the two
candidates alternately in one process (A B B A A B ...), so clock-frequency drift, thermal state
and background load hit both equally instead of whichever happened to run second.

Conventions: eager runs are in ``torch.inference_mode()`` with the model in eval mode (its flag is
restored); ``threads`` sets ``torch.set_num_threads`` for the measurement only; statistics are
over individual calls timed with ``time.perf_counter``; warm-up calls are not timed. A deployed
file runs in the runtime its suffix picks (``.onnx``: ONNX Runtime, ``.xml``: OpenVINO,
``.tflite``: the LiteRT interpreter on batch-1 inputs), or the one a
:class:`~modelpress.runtime.Deployed` names (``Deployed("m.onnx", "openvino")``); ``threads`` is
then the runtime's thread count.

Before timing, :func:`check_memory` compares a lower bound of the memory the benchmark will
allocate (the largest layer output at the benchmark's batch size, plus ONNX Runtime's copy of the
weights) with the memory still available (``MemAvailable``, the cgroup limit, or
``$MODELPRESS_MEMORY_LIMIT``, e.g. ``4G``); a model too large for it is a one-line
:class:`~modelpress.core.errors.ResourceError` instead of a process killed by the OOM killer.

Example::

    >>> import torch
    >>> from torch import nn
    >>> stats = measure_latency(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, repeats=5, threads=1)
    >>> stats.runs, stats.threads, stats.batch_size
    (5, 1, 4)
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.data import batch_size_of, call_model, slice_inputs, tensor_bytes
from ..core.errors import ConfigError, ResourceError
from ..core.resources import MEMORY_LIMIT_ENV, available_memory_bytes  # noqa: F401 (re-exported)
from ..export.onnx import ort_feeds
from ..runtime import Deployed, as_deployed
from .params import dense_bytes

MAX_RUNS = 100_000  # cap for min_time_s on very fast calls


@dataclass
class LatencyStats:
    """Latency of one call (milliseconds) over ``runs`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    threads: int | None
    batch_size: int | None

    @property
    def per_sample_ms(self) -> float | None:
        return self.median_ms / self.batch_size if self.batch_size else None

    @property
    def throughput_per_s(self) -> float | None:
        """Samples per second at the median latency."""
        return 1000.0 * self.batch_size / self.median_ms if self.batch_size and self.median_ms else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_times(cls, times_s: list[float], threads: int | None, batch_size: int | None) -> "LatencyStats":
        ms = np.asarray(times_s, dtype=np.float64) * 1000.0
        p10, p25, p50, p75, p90 = np.percentile(ms, [10, 25, 50, 75, 90])
        return cls(median_ms=float(p50), p10_ms=float(p10), p90_ms=float(p90), iqr_ms=float(p75 - p25),
                   mean_ms=float(ms.mean()), std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
                   runs=int(ms.size), threads=threads, batch_size=batch_size)


@dataclass
class LatencyComparison:
    """Interleaved A/B measurement; ``ratio`` = A median / B median (> 1: B is faster).

    ``ratio_p10`` / ``ratio_p90`` are percentiles of the per-round ratios A_i / B_i, a spread
    to quote next to the ratio.
    """

    a: LatencyStats
    b: LatencyStats
    ratio: float
    ratio_p10: float
    ratio_p90: float

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "ratio": self.ratio,
                "ratio_p10": self.ratio_p10, "ratio_p90": self.ratio_p90}


def largest_activation_bytes(model: nn.Module, inputs: Any) -> int:
    """Bytes of the largest output of one layer of ``model`` on ``inputs`` (at their batch size),
    measured on one sample and scaled: any forward on ``inputs`` allocates at least this much."""
    try:
        batch = batch_size_of(inputs)
    except (AttributeError, IndexError, StopIteration, TypeError):
        return 0
    sizes = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(tensor_bytes(out)))
             for m in model.modules()]
    try:
        with torch.inference_mode(), _eval(model):
            call_model(model, slice_inputs(inputs, 1))
    finally:
        for h in hooks:
            h.remove()
    return max(sizes) * batch


def memory_needed(targets: list[Any], inputs: Any, *, onnx: bool = False,
                  inputs_each: list[Any] | None = None) -> dict[str, int]:
    """A lower bound of the memory a latency benchmark of ``targets`` on ``inputs`` allocates on
    top of what already exists: ``activations`` (the largest layer output at this batch size; the
    targets run one at a time) and ``onnx_weights`` (ONNX Runtime's own copy of the weights: the
    size of each ``.onnx`` target, plus each module's weights when ``onnx=True`` will export it).
    ``inputs_each`` gives each target its own inputs (default: ``inputs`` for all)."""

    activations, weights = 0, 0
    for t, x in zip(targets, inputs_each or [inputs] * len(targets)):
        deployed = as_deployed(t)
        if deployed is not None:  # the runtime's own copy of the weights
            weights += deployed.path.stat().st_size if deployed.path.exists() else 0
        elif isinstance(t, nn.Module):
            activations = max(activations, largest_activation_bytes(t, x))
            if onnx:
                weights += dense_bytes(t)
    return {"activations": activations, "onnx_weights": weights, "total": activations + weights}


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


def check_memory(targets: list[Any], inputs: Any, *, onnx: bool = False, inputs_each: list[Any] | None = None,
                 what: str = "the latency benchmark") -> dict[str, int]:
    """Raise :class:`ResourceError` when :func:`memory_needed` exceeds
    :func:`available_memory_bytes`; returns the estimate (a lower bound, so no false alarms).

    >>> import torch
    >>> from torch import nn
    >>> check_memory([nn.Linear(1000, 1000)], torch.randn(64, 1000))["activations"]
    256000
    """
    need = memory_needed(targets, inputs, onnx=onnx, inputs_each=inputs_each)
    free = available_memory_bytes()
    if free is not None and need["total"] > free:
        name = next((type(t).__name__ for t in targets if isinstance(t, nn.Module)), "the model")
        bs = _batch_size(inputs)
        parts = f"activations {_mb(need['activations'])}" + (
            f", ONNX Runtime's copy of the weights {_mb(need['onnx_weights'])}" if need["onnx_weights"] else "")
        raise ResourceError(
            f"{what} of {name} at batch size {bs} needs at least {_mb(need['total'])} ({parts}) "
            f"but only {_mb(free)} is available",
            hint="measure smaller batch sizes (eval.batch_sizes / --batch-sizes), skip ONNX "
                 "(eval.onnx=false / --no-onnx) or latency (eval.latency=false), or use a machine with more memory")
    return need


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Temporarily ``torch.set_num_threads(threads)`` (no-op for None)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"threads must be >= 1 (got {threads})")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _eval(target: Any):
    was_training = getattr(target, "training", None)
    if isinstance(target, nn.Module):
        target.eval()
    try:
        yield
    finally:
        if isinstance(target, nn.Module):
            target.train(was_training)


def _deployed_call(deployed: Deployed, inputs: Any, threads: int | None) -> Callable[[], Any]:
    session = deployed.open(threads)
    feeds = session.feeds(inputs)  # converted once: the timing covers the runtime's call only
    return lambda: session.invoke(feeds)


def _as_call(target: Any, inputs: Any, threads: int | None) -> Callable[[], Any]:
    """A zero-argument call running ``target`` once on ``inputs``."""
    if hasattr(target, "get_inputs") and hasattr(target, "run"):  # an onnxruntime.InferenceSession
        feeds = ort_feeds(target, inputs)
        return lambda: target.run(None, feeds)
    deployed = as_deployed(target)
    if deployed is not None:
        return _deployed_call(deployed, inputs, threads)
    if isinstance(target, (str, os.PathLike)):
        raise ConfigError(f"cannot time {os.fspath(target)}: no runtime runs {Path(target).suffix or 'it'}",
                          hint="pass an .onnx, .xml (OpenVINO) or .tflite file, or Deployed(path, runtime)")
    if not callable(target):
        raise ConfigError(f"cannot time a {type(target).__name__}",
                          hint="pass an nn.Module, a callable, a deployed file or Deployed(path, runtime)")
    return lambda: call_model(target, inputs)


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"need warmup >= 0 and repeats >= 1 (got warmup={warmup}, repeats={repeats})")


def _batch_size(inputs: Any) -> int | None:
    try:
        return batch_size_of(inputs)
    except (AttributeError, IndexError, StopIteration, TypeError):
        return None


def _time_calls(calls: list[Callable[[], Any]], warmup: int, repeats: int, min_time_s: float,
                max_time_s: float | None) -> list[list[float]]:
    """Time each call in turn per round, alternating the order (ABBA) to cancel order effects.

    Runs at least ``repeats`` rounds, more until ``min_time_s`` of timed calls have passed,
    and stops early (after at least one round) once ``max_time_s`` is spent.
    """
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    spent = 0.0
    rounds = 0
    while True:
        order = range(len(calls)) if rounds % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            t0 = time.perf_counter()
            calls[i]()
            dt = time.perf_counter() - t0
            times[i].append(dt)
            spent += dt
        rounds += 1
        if max_time_s is not None and time.perf_counter() - start >= max_time_s:
            break
        if rounds >= repeats and (spent >= min_time_s or rounds >= MAX_RUNS):
            break
    return times


def measure_latency(fn_or_model: Any, inputs: Any, *, warmup: int = 5, repeats: int = 30,
                    threads: int | None = None, min_time_s: float = 0.0,
                    max_time_s: float | None = None) -> LatencyStats:
    """Latency of ``fn_or_model(inputs)`` (inputs in the batch convention).

    ``fn_or_model`` is an ``nn.Module``, any callable, or a path to an ``.onnx`` file (timed
    with ONNX Runtime, see :func:`measure_onnxruntime`) or a ``.tflite`` file (the LiteRT
    interpreter, :func:`measure_litert`). ``min_time_s`` keeps timing past
    ``repeats`` until that much time was measured (steadier numbers for sub-millisecond calls);
    ``max_time_s`` is a budget that stops early.
    """
    deployed = as_deployed(fn_or_model)
    if deployed is not None:
        return measure_deployed(deployed, inputs, threads=threads, warmup=warmup, repeats=repeats,
                                min_time_s=min_time_s, max_time_s=max_time_s)
    _check_counts(warmup, repeats)
    check_memory([fn_or_model], inputs)
    with torch_threads(threads), _eval(fn_or_model), torch.inference_mode():
        call = _as_call(fn_or_model, inputs, threads)
        (times,) = _time_calls([call], warmup, repeats, min_time_s, max_time_s)
        used = torch.get_num_threads()
    return LatencyStats.from_times(times, used, _batch_size(inputs))


def measure_deployed(target: Any, inputs: Any, *, threads: int | None = 1, warmup: int = 5, repeats: int = 30,
                     min_time_s: float = 0.0, max_time_s: float | None = None) -> LatencyStats:
    """Latency of one call of a deployed file in its runtime (:class:`~modelpress.runtime.Deployed`, or
    a path whose suffix picks it): ONNX Runtime ``session.run`` (CPU, all graph optimisations,
    inter-op 1), an OpenVINO infer request (CPU, latency hint, one stream), or one LiteRT ``invoke``
    (XNNPACK; batch-1 inputs, NCHW images turned to NHWC for a channels-last file). ``threads``: the
    runtime's intra-op threads (None: its default; LiteRT's is 1)."""
    _check_counts(warmup, repeats)
    deployed = as_deployed(target)
    if deployed is None:
        raise ConfigError(f"{target!r} is not a deployed file", hint="pass a path or Deployed(path, runtime)")
    check_memory([deployed], inputs)
    call = _deployed_call(deployed, inputs, threads)
    (times,) = _time_calls([call], warmup, repeats, min_time_s, max_time_s)
    return LatencyStats.from_times(times, _threads_of(deployed, threads, threads), _batch_size(inputs))


def measure_onnxruntime(onnx_path: Any, inputs: Any, *, threads: int | None = 1,
                        warmup: int = 5, repeats: int = 30, min_time_s: float = 0.0,
                        max_time_s: float | None = None) -> LatencyStats:
    """Latency of ``session.run`` on an ONNX file in ONNX Runtime (:func:`measure_deployed`);
    ``onnx_path`` may also be an ``onnxruntime.InferenceSession``."""
    if as_deployed(onnx_path) is not None:
        return measure_deployed(Deployed(onnx_path, "onnxruntime"), inputs, threads=threads, warmup=warmup,
                                repeats=repeats, min_time_s=min_time_s, max_time_s=max_time_s)
    _check_counts(warmup, repeats)
    (times,) = _time_calls([_as_call(onnx_path, inputs, threads)], warmup, repeats, min_time_s, max_time_s)
    return LatencyStats.from_times(times, threads, _batch_size(inputs))


def measure_litert(tflite_path: Any, inputs: Any, *, threads: int = 1, warmup: int = 5, repeats: int = 30,
                   min_time_s: float = 0.0, max_time_s: float | None = None) -> LatencyStats:
    """Latency of one ``invoke`` of a ``.tflite`` file in the LiteRT interpreter (:func:`measure_deployed`)."""
    return measure_deployed(Deployed(tflite_path, "litert"), inputs, threads=threads, warmup=warmup,
                            repeats=repeats, min_time_s=min_time_s, max_time_s=max_time_s)


def measure_together(targets: dict[str, Any], inputs: Any, *, warmup: int = 5, repeats: int = 30,
                     threads: int | None = None, min_time_s: float = 0.0,
                     max_time_s: float | None = None) -> dict[str, LatencyStats]:
    """Time every target (anything :func:`measure_latency` accepts) in turns, round by round, in this
    process, so drift and background load hit all of them alike; ``{name: stats}``."""
    _check_counts(warmup, repeats)
    names = list(targets)
    check_memory([targets[n] for n in names], inputs)
    models = [t for t in targets.values() if isinstance(t, nn.Module)]
    with torch_threads(threads), contextlib.ExitStack() as stack, torch.inference_mode():
        for m in models:
            stack.enter_context(_eval(m))
        calls = [_as_call(targets[n], inputs, threads) for n in names]
        times = _time_calls(calls, warmup, repeats, min_time_s, max_time_s)
        used = torch.get_num_threads()
    return {n: LatencyStats.from_times(t, _threads_of(targets[n], threads, used), _batch_size(inputs))
            for n, t in zip(names, times)}


def compare_latency(a: Any, b: Any, inputs: Any, *, inputs_b: Any = None, warmup: int = 5,
                    repeats: int = 30, threads: int | None = None, min_time_s: float = 0.0,
                    max_time_s: float | None = None) -> LatencyComparison:
    """Time ``a`` and ``b`` alternately in this process; ``ratio`` > 1 means ``b`` is faster.

    ``a`` / ``b``: anything :func:`measure_latency` accepts (models, callables, ``.onnx`` and ``.tflite`` paths).
    ``inputs_b`` feeds ``b`` when it needs another input structure (default: ``inputs``).

    >>> import torch
    >>> from torch import nn
    >>> cmp = compare_latency(nn.Linear(64, 64), nn.Linear(64, 8), torch.randn(8, 64), repeats=5)
    >>> cmp.a.runs == cmp.b.runs == 5
    True
    """
    _check_counts(warmup, repeats)
    inputs_b = inputs if inputs_b is None else inputs_b
    check_memory([a, b], inputs, inputs_each=[inputs, inputs_b])  # both are alive together
    with torch_threads(threads), _eval(a), _eval(b), torch.inference_mode():
        calls = [_as_call(a, inputs, threads), _as_call(b, inputs_b, threads)]
        times_a, times_b = _time_calls(calls, warmup, repeats, min_time_s, max_time_s)
        used = torch.get_num_threads()
    stats_a = LatencyStats.from_times(times_a, _threads_of(a, threads, used), _batch_size(inputs))
    stats_b = LatencyStats.from_times(times_b, _threads_of(b, threads, used), _batch_size(inputs_b))
    per_round = [ta / tb for ta, tb in zip(times_a, times_b) if tb > 0]
    p10, p90 = np.percentile(per_round, [10, 90]) if per_round else (float("nan"),) * 2
    ratio = stats_a.median_ms / stats_b.median_ms if stats_b.median_ms > 0 else float("inf")
    return LatencyComparison(a=stats_a, b=stats_b, ratio=ratio, ratio_p10=float(p10), ratio_p90=float(p90))


def _threads_of(target: Any, threads: int | None, torch_threads_used: int | None) -> int | None:
    deployed = as_deployed(target)
    if deployed is None:
        return torch_threads_used
    return (threads or 1) if deployed.runtime == "litert" else threads  # LiteRT's default is 1 thread
