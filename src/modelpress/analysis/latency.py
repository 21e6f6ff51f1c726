"""Wall-clock latency of a model (eager PyTorch or ONNX Runtime), and fair A/B comparisons.

Every "x times faster" claim in modelpress comes from :func:`compare_latency`, which runs the two
candidates alternately in one process (A B B A A B ...), so clock-frequency drift, thermal state
and background load hit both equally instead of whichever happened to run second.

Conventions: eager runs are in ``torch.inference_mode()`` with the model in eval mode (its flag is
restored); ``threads`` sets ``torch.set_num_threads`` for the measurement only; statistics are
over individual calls timed with ``time.perf_counter``; warm-up calls are not timed.

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
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.data import batch_size_of, call_model
from ..core.errors import ConfigError

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


def _is_onnx(target: Any) -> bool:
    return isinstance(target, (str, os.PathLike)) and str(target).endswith(".onnx")


def _ort_call(path_or_session: Any, inputs: Any, threads: int | None) -> Callable[[], Any]:
    from ..export.onnx import ort_feeds, ort_session

    session = path_or_session if hasattr(path_or_session, "run") else \
        ort_session(path_or_session, threads=threads)
    feeds = ort_feeds(session, inputs)  # converted once: the timing covers session.run only
    return lambda: session.run(None, feeds)


def _as_call(target: Any, inputs: Any, threads: int | None) -> Callable[[], Any]:
    """A zero-argument call running ``target`` once on ``inputs``."""
    if _is_onnx(target):
        return _ort_call(target, inputs, threads)
    if not callable(target):
        raise ConfigError(f"cannot time a {type(target).__name__}",
                          hint="pass an nn.Module, a callable or a path to an .onnx file")
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
    with ONNX Runtime, see :func:`measure_onnxruntime`). ``min_time_s`` keeps timing past
    ``repeats`` until that much time was measured (steadier numbers for sub-millisecond calls);
    ``max_time_s`` is a budget that stops early.
    """
    if _is_onnx(fn_or_model):
        return measure_onnxruntime(fn_or_model, inputs, threads=threads, warmup=warmup,
                                   repeats=repeats, min_time_s=min_time_s, max_time_s=max_time_s)
    _check_counts(warmup, repeats)
    with torch_threads(threads), _eval(fn_or_model), torch.inference_mode():
        call = _as_call(fn_or_model, inputs, threads)
        (times,) = _time_calls([call], warmup, repeats, min_time_s, max_time_s)
        used = torch.get_num_threads()
    return LatencyStats.from_times(times, used, _batch_size(inputs))


def measure_onnxruntime(onnx_path: Any, inputs: Any, *, threads: int | None = 1,
                        warmup: int = 5, repeats: int = 30, min_time_s: float = 0.0,
                        max_time_s: float | None = None) -> LatencyStats:
    """Latency of ``session.run`` on an ONNX file (CPU provider, ORT_ENABLE_ALL, inter-op 1).

    ``onnx_path`` may also be an ``onnxruntime.InferenceSession``. ``threads`` is ORT's
    intra-op thread count (None: ORT's default, all cores).
    """
    _check_counts(warmup, repeats)
    call = _ort_call(onnx_path, inputs, threads)
    (times,) = _time_calls([call], warmup, repeats, min_time_s, max_time_s)
    return LatencyStats.from_times(times, threads, _batch_size(inputs))


def compare_latency(a: Any, b: Any, inputs: Any, *, inputs_b: Any = None, warmup: int = 5,
                    repeats: int = 30, threads: int | None = None, min_time_s: float = 0.0,
                    max_time_s: float | None = None) -> LatencyComparison:
    """Time ``a`` and ``b`` alternately in this process; ``ratio`` > 1 means ``b`` is faster.

    ``a`` / ``b``: anything :func:`measure_latency` accepts (models, callables, ``.onnx`` paths).
    ``inputs_b`` feeds ``b`` when it needs another input structure (default: ``inputs``).

    >>> import torch
    >>> from torch import nn
    >>> cmp = compare_latency(nn.Linear(64, 64), nn.Linear(64, 8), torch.randn(8, 64), repeats=5)
    >>> cmp.a.runs == cmp.b.runs == 5
    True
    """
    _check_counts(warmup, repeats)
    inputs_b = inputs if inputs_b is None else inputs_b
    with torch_threads(threads), _eval(a), _eval(b), torch.inference_mode():
        calls = [_as_call(a, inputs, threads), _as_call(b, inputs_b, threads)]
        times_a, times_b = _time_calls(calls, warmup, repeats, min_time_s, max_time_s)
        used = torch.get_num_threads()
    stats_a = LatencyStats.from_times(times_a, threads if _is_onnx(a) else used, _batch_size(inputs))
    stats_b = LatencyStats.from_times(times_b, threads if _is_onnx(b) else used, _batch_size(inputs_b))
    per_round = [ta / tb for ta, tb in zip(times_a, times_b) if tb > 0]
    p10, p90 = np.percentile(per_round, [10, 90]) if per_round else (float("nan"),) * 2
    ratio = stats_a.median_ms / stats_b.median_ms if stats_b.median_ms > 0 else float("inf")
    return LatencyComparison(a=stats_a, b=stats_b, ratio=ratio, ratio_p10=float(p10), ratio_p90=float(p90))
