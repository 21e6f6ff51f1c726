"""Calibration observers: watch tensors, then say which range ``[lo, hi]`` to quantize.

An observer is fed batches with ``update(x)`` and answers ``range() -> (lo, hi)``, two float
tensors of shape ``(rows, 1)``: one row per tensor (``granularity="tensor"``) or per channel
along ``spec.axis`` (``granularity="channel"``), the layout of
:func:`~modelpress.quantization.primitives.minmax`, so ``qparams(*obs.range(), spec)`` gives the
scales. :func:`make_observer` builds one by name:

=================  =========================================================================
``minmax``         running min / max (never clips)
``moving_minmax``  exponential moving average of each batch's min / max (``momentum``)
``percentile``     the ``percentile`` of ``|x|`` (``tails="abs"``) or of both tails
``mse``            the clipping range minimising the expected quantization MSE at ``spec.bits``
``kl``             TensorRT's entropy calibration: the ``|x|`` threshold minimising the KL
                   divergence between the 2048-bin histogram and its quantized version
=================  =========================================================================

The last three keep a histogram per row (``bins``, default 2048). When a batch exceeds the range
seen so far, the histogram is re-binned onto the wider range (its counts spread linearly within the
old bins), so the order of batches does not limit the range. Histograms always cover 0, which
every range includes (0 must be exact).

    >>> import torch
    >>> from modelpress.quantization.observers import make_observer
    >>> from modelpress.quantization.primitives import QuantSpec
    >>> x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    >>> x[0] = 50.0  # one outlier
    >>> spec = QuantSpec(bits=8, symmetric=True)
    >>> obs = make_observer("percentile", spec, percentile=99.9)
    >>> obs.update(x)
    >>> lo, hi = obs.range()
    >>> 2.5 < float(hi) < 4.0, float(make_observer("minmax", spec).observe(x)[1])
    (True, 50.0)
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from ..core.registry import Registry
from .primitives import QuantSpec, _grouped, minmax, qparams

ObserverName = Literal["minmax", "moving_minmax", "percentile", "mse", "kl"]


def _rows(x: torch.Tensor, spec: QuantSpec, where: str) -> torch.Tensor:
    """``x`` as ``(rows, values)`` after checking it is non-empty and finite."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{where}: expected a tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise DataError(f"{where}: got an empty tensor of shape {tuple(x.shape)}",
                        hint="calibrate on non-empty batches")
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise DataError(f"{where}: the tensor contains NaN or Inf values",
                        hint="check the calibration data and the model's activations")
    return _grouped(x, spec)


class Observer:
    """Common interface: ``update(x)`` any number of times, then ``range()`` / ``qparams()``."""

    name: ClassVar[str] = ""

    def __init__(self, spec: QuantSpec):
        if spec.granularity == "group":
            raise ConfigError(f"{type(self).__name__}: observers work per tensor or per channel, "
                              "not per group", hint="use granularity='tensor' or 'channel'")
        self.spec = spec
        self.batches = 0
        self._n_rows: int | None = None

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.spec, f"{type(self).__name__}.update")
        if self._n_rows is not None and rows.shape[0] != self._n_rows:
            raise DataError(f"{type(self).__name__}.update: got {rows.shape[0]} channels along axis "
                            f"{self.spec.axis}, earlier batches had {self._n_rows}",
                            hint="feed tensors of one layout, or use granularity='tensor'")
        self._n_rows = rows.shape[0]
        self.batches += 1
        return rows

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``, float32 tensors of shape ``(rows, 1)``."""
        if not self.batches:
            raise DataError(f"{type(self).__name__}: range() before any update()",
                            hint="run calibration batches through the model first")
        lo, hi = self._range()
        return lo.float().reshape(-1, 1), hi.float().reshape(-1, 1)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for ``spec`` over :meth:`range`."""
        return qparams(*self.range(), self.spec)

    def observe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``update(x)`` then ``range()``: for weights, which are seen once."""
        self.update(x)
        return self.range()


class MinMaxObserver(Observer):
    """Running minimum and maximum: the range covers every value seen."""

    name = "minmax"

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.lo = self.hi = None

    def update(self, x: torch.Tensor) -> None:
        self._check(x)
        lo, hi = minmax(x, self.spec)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _range(self):
        return self.lo, self.hi


class MovingMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min / max: ``lo = m * lo + (1 - m) * batch_lo``."""

    name = "moving_minmax"

    def __init__(self, spec: QuantSpec, momentum: float = 0.9):
        if not 0 <= momentum < 1:
            raise ConfigError(f"MovingMinMaxObserver.momentum must be in [0, 1) (got {momentum})")
        super().__init__(spec)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        self._check(x)
        lo, hi = minmax(x, self.spec)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi


class HistogramObserver(Observer):
    """A ``bins``-bin histogram per row over ``[lo, hi]`` (always containing 0), re-binned as it grows."""

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        if bins < 16:
            raise ConfigError(f"{type(self).__name__}.bins must be >= 16 (got {bins})")
        super().__init__(spec)
        self.bins = bins
        self.lo = self.hi = self.counts = None  # float64 numpy: (rows,), (rows,), (rows, bins)
        self.zeros = None  # exact zeros per row: always representable, so free of rounding error

    def update(self, x: torch.Tensor) -> None:
        rows = self._check(x).double().numpy()
        lo = np.minimum(rows.min(axis=1), 0.0)
        hi = np.maximum(rows.max(axis=1), 0.0)
        if self.counts is None:
            self.lo, self.hi = lo, hi
            self.counts = np.zeros((rows.shape[0], self.bins))
            self.zeros = np.zeros(rows.shape[0])
        else:
            lo, hi = np.minimum(lo, self.lo), np.maximum(hi, self.hi)
            grown = (lo < self.lo) | (hi > self.hi)
            for r in np.flatnonzero(grown):
                self.counts[r] = self._rebin(self.counts[r], self.lo[r], self.hi[r], lo[r], hi[r])
            self.lo, self.hi = lo, hi
        width = np.maximum(self.hi - self.lo, 1e-30)
        idx = np.floor((rows - self.lo[:, None]) / width[:, None] * self.bins)
        idx = np.clip(idx, 0, self.bins - 1).astype(np.int64) + np.arange(rows.shape[0])[:, None] * self.bins
        self.counts += np.bincount(idx.reshape(-1), minlength=self.counts.size).reshape(self.counts.shape)
        self.zeros += (rows == 0).sum(axis=1)

    def _rebin(self, counts, lo, hi, new_lo, new_hi) -> np.ndarray:
        old = np.linspace(lo, hi, self.bins + 1)
        new = np.linspace(new_lo, new_hi, self.bins + 1)
        cdf = np.concatenate([[0.0], np.cumsum(counts)])
        if hi <= lo:  # everything seen so far was 0
            return np.diff(np.where(new >= 0, cdf[-1], 0.0))
        return np.diff(np.interp(new, old, cdf, left=0.0, right=cdf[-1]))

    def edges(self, r: int) -> np.ndarray:
        return np.linspace(self.lo[r], self.hi[r], self.bins + 1)

    def cdf(self, r: int, t: np.ndarray) -> np.ndarray:
        """Number of values ``<= t`` in row ``r`` (linear within bins)."""
        cum = np.concatenate([[0.0], np.cumsum(self.counts[r])])
        return np.interp(t, self.edges(r), cum, left=0.0, right=cum[-1])

    def abs_histogram(self, r: int, bins: int | None = None) -> tuple[np.ndarray, float]:
        """Histogram of ``|x|`` of row ``r`` over ``[0, amax]`` and ``amax``."""
        bins = bins or self.bins
        amax = max(-self.lo[r], self.hi[r])
        t = np.linspace(0.0, amax, bins + 1)
        return np.diff(self.cdf(r, t) - self.cdf(r, -t)), float(amax)

    def _range(self):
        lo, hi = zip(*(self.row_range(r) for r in range(self.counts.shape[0])))
        return torch.tensor(lo), torch.tensor(hi)

    def row_range(self, r: int) -> tuple[float, float]:
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    """Clip at a percentile: of ``|x|`` (``tails="abs"``, symmetric default) or of each tail
    (``tails="both"``: ``[P(100 - p), P(p)]``, asymmetric default)."""

    name = "percentile"

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, tails: Literal["abs", "both"] | None = None,
                 bins: int = 2048):
        if not 50 < percentile <= 100:
            raise ConfigError(f"PercentileObserver.percentile must be in (50, 100] (got {percentile})")
        if tails not in (None, "abs", "both"):
            raise ConfigError(f"PercentileObserver.tails must be 'abs' or 'both' (got {tails!r})")
        super().__init__(spec, bins)
        self.percentile = percentile
        self.tails = tails or ("abs" if spec.symmetric else "both")

    def row_range(self, r: int) -> tuple[float, float]:
        total = self.counts[r].sum()
        p = self.percentile / 100
        if self.tails == "abs":
            hist, amax = self.abs_histogram(r, 4 * self.bins)
            cum = np.concatenate([[0.0], np.cumsum(hist)])
            t = float(np.interp(p * total, cum, np.linspace(0.0, amax, cum.size)))
            return max(self.lo[r], -t), min(self.hi[r], t)
        edges = self.edges(r)
        cum = np.concatenate([[0.0], np.cumsum(self.counts[r])])
        lo = float(np.interp((1 - p) * total, cum, edges))
        hi = float(np.interp(p * total, cum, edges))
        return min(lo, 0.0), max(hi, 0.0)


class MSEObserver(HistogramObserver):
    """The range minimising expected squared error at ``spec.bits``: clipped values cost their
    distance to the range edge, values inside cost ``scale**2 / 12`` (rounding noise; exact zeros
    cost nothing). Searched over ``grid`` shrink factors of the seen range, then each end alone."""

    name = "mse"

    def __init__(self, spec: QuantSpec, grid: int = 200, bins: int = 2048):
        if grid < 10:
            raise ConfigError(f"MSEObserver.grid must be >= 10 (got {grid})")
        super().__init__(spec, bins)
        self.grid = grid

    def _costs(self, r: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Expected total squared error of row ``r`` for each candidate range ``(lo[k], hi[k])``."""
        scale, zero = (t.double().numpy() for t in qparams(torch.from_numpy(lo), torch.from_numpy(hi), self.spec))
        qlo, qhi = (self.spec.qmin - zero) * scale, (self.spec.qmax - zero) * scale
        edges = self.edges(r)
        centers = (edges[:-1] + edges[1:]) / 2
        n = self.counts[r]
        cn = np.concatenate([[0.0], np.cumsum(n)])
        c1 = np.concatenate([[0.0], np.cumsum(n * centers)])
        c2 = np.concatenate([[0.0], np.cumsum(n * centers ** 2)])
        i_lo = np.searchsorted(centers, qlo, side="left")  # bins [0, i_lo) lie below qlo
        i_hi = np.searchsorted(centers, qhi, side="right")  # bins [i_hi, end) lie above qhi
        below = c2[i_lo] - 2 * qlo * c1[i_lo] + qlo ** 2 * cn[i_lo]
        above = (c2[-1] - c2[i_hi]) - 2 * qhi * (c1[-1] - c1[i_hi]) + qhi ** 2 * (cn[-1] - cn[i_hi])
        inside = np.maximum(cn[i_hi] - cn[i_lo] - self.zeros[r], 0.0)
        return below + above + inside * scale ** 2 / 12

    def row_range(self, r: int) -> tuple[float, float]:
        lo, hi = self.lo[r], self.hi[r]
        if hi <= lo:
            return lo, hi
        f = np.linspace(1.0 / self.grid, 1.0, self.grid)
        if self.spec.symmetric:
            amax = max(-lo, hi)
            best = f[np.argmin(self._costs(r, -amax * f, amax * f))]
            return max(lo, -best * amax), min(hi, best * amax)
        k = int(np.argmin(self._costs(r, lo * f, hi * f)))
        best_lo, best_hi = lo * f[k], hi * f[k]
        if lo < 0:  # each end alone, keeping the other
            best_lo = lo * f[np.argmin(self._costs(r, lo * f, np.full_like(f, best_hi)))]
        if hi > 0:
            best_hi = hi * f[np.argmin(self._costs(r, np.full_like(f, best_lo), hi * f))]
        return float(best_lo), float(best_hi)


class KLObserver(HistogramObserver):
    """TensorRT's entropy calibration: for each candidate threshold (bin ``i`` of a histogram of
    ``|x|``), fold the tail into bin ``i - 1``, merge the ``i`` bins into as many levels as the
    integers give that side, expand back, and keep the threshold with the smallest KL divergence.

    Symmetric specs use one threshold on ``|x|``. Asymmetric specs pick one per side, each side
    getting its share of the levels: a lopsided input (MNIST's background is one negative value,
    the strokes reach +2.8) would otherwise be clipped to the background's magnitude. Exact zeros
    are left out of the histograms (exact at every threshold)."""

    name = "kl"

    def __init__(self, spec: QuantSpec, bins: int = 2048, stride: int | None = None):
        if stride is not None and stride < 1:
            raise ConfigError(f"KLObserver.stride must be >= 1 (got {stride})")
        super().__init__(spec, bins)
        self.stride = stride

    def _side_histogram(self, r: int, sign: int) -> tuple[np.ndarray, float]:
        """Histogram of ``|x|`` over values of one sign (``sign=0``: both) of row ``r``."""
        amax = {1: self.hi[r], -1: -self.lo[r], 0: max(-self.lo[r], self.hi[r])}[sign]
        t = np.linspace(0.0, amax, self.bins + 1)
        cum = (self.cdf(r, t) - self.cdf(r, 0.0) if sign == 1 else
               self.cdf(r, 0.0) - self.cdf(r, -t) if sign == -1 else self.cdf(r, t) - self.cdf(r, -t))
        hist = np.diff(cum)
        if sign == 0:
            hist[0] -= min(self.zeros[r], hist[0])
        return np.maximum(hist, 0.0), float(amax)

    def _threshold(self, hist: np.ndarray, amax: float, nq: int) -> float:
        nq = max(min(nq, self.bins), 1)
        best_i, best_kl = self.bins, math.inf
        # every bin as in TensorRT costs ~0.2 s per tensor; ~512 candidates lose < 0.3% of amax
        stride = self.stride or max(1, (self.bins - nq) // 512)
        tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
        for i in range(nq, self.bins + 1, stride):
            p = hist[:i].copy()
            p[-1] += tail[i]
            if p.sum() <= 0:
                continue
            kl = _kl_of_quantized(hist[:i], p, nq)
            if kl < best_kl:
                best_i, best_kl = i, kl
        return best_i * amax / self.bins

    def row_range(self, r: int) -> tuple[float, float]:
        lo, hi = float(self.lo[r]), float(self.hi[r])
        if hi <= lo:
            return lo, hi
        levels = self.spec.qmax - self.spec.qmin + 1
        if self.spec.symmetric:
            hist, amax = self._side_histogram(r, 0)
            t = self._threshold(hist, amax, levels // 2)
            return max(lo, -t), min(hi, t)
        out, zeros = [lo, hi], self.zeros[r]
        for k, sign in ((1, 1), (0, -1)):  # exact zeros come off the first bin(s) next to 0
            if out[k] == 0:
                continue
            hist, amax = self._side_histogram(r, sign)
            taken = min(zeros, hist[0])
            hist[0], zeros = hist[0] - taken, zeros - taken
            out[k] = sign * self._threshold(hist, amax, round(levels * abs(out[k]) / (hi - lo)))
        return out[0], out[1]


def _kl_of_quantized(sliced: np.ndarray, p: np.ndarray, nq: int) -> float:
    """KL(p || q) where q merges ``sliced`` into ``nq`` levels and spreads each level's mass
    evenly over its non-empty source bins (the TensorRT / MXNet recipe)."""
    i = sliced.size
    starts = (np.arange(nq) * i) // nq
    nonzero = sliced > 0
    merged = np.add.reduceat(sliced, starts)
    support = np.add.reduceat(nonzero.astype(np.float64), starts)
    level = np.repeat(np.arange(nq), np.diff(np.append(starts, i)))
    q = np.where(nonzero, merged[level] / np.maximum(support[level], 1.0), 0.0)
    p = p / p.sum()
    q = q / max(q.sum(), 1e-300)
    mask = p > 0
    # a bin of p that q leaves empty (only the folded tail bin can be) gets a tiny mass, not inf
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


OBSERVERS: Registry[type[Observer]] = Registry("observer")
for _cls in (MinMaxObserver, MovingMinMaxObserver, PercentileObserver, MSEObserver, KLObserver):
    OBSERVERS.register(_cls.name, _cls)


def make_observer(name: str, spec: QuantSpec, **options) -> Observer:
    """An observer by name (see the module docstring) with its options, e.g. ``percentile=99.9``.

    >>> make_observer("kl", QuantSpec(symmetric=False, signed=False)).bins
    2048
    """
    cls = OBSERVERS.get(name)
    try:
        return cls(spec, **options)
    except TypeError as exc:
        raise ConfigError(f"observer {name!r}: {exc}", hint=f"see help({cls.__name__}) for its options") from None
