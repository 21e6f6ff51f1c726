"""Per-layer pruning sensitivity: accuracy (or loss) vs sparsity, one layer at a time.

For every prunable layer in scope and every sparsity in ``sparsities``, only that layer is
magnitude-pruned (exactly ``round(s * n)`` weights), the model is evaluated, and the
weights are restored. :func:`sensitivity_scan` returns a :class:`SensitivityResult` with a
rich table, a dict (JSON-ready), a PNG plot (one curve per layer) and
:meth:`~SensitivityResult.ratios_for_target`, which turns the curves into per-layer
sparsities that meet a global target while losing as little accuracy as possible.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress.pruning.sensitivity import SensitivityConfig, sensitivity_scan
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> x = torch.randn(128, 8); data = [(x, (x[:, 0] > 0).long())]
    >>> res = sensitivity_scan(m, data, SensitivityConfig(sparsities=[0.5, 0.9], keep_first_last=False))
    >>> sorted(res.curves), len(res.curves["2"])
    (['0', '2', '4'], 2)
    >>> ratios = res.ratios_for_target(0.5)  # feed to MagnitudePruning(layer_sparsity=ratios)
    >>> sum(round(r * res.sizes[n]) for n, r in ratios.items()) == round(0.5 * sum(res.sizes.values()))
    True
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..core.config import StrictModel
from ..core.data import as_data, batch_size_of, split_batch
from ..core.errors import ConfigError
from ..core.io import atomic_path
from ..core.progress import progress_bar
from ..core.scope import Scope, first_and_last
from ..core.training import classification_loss, evaluate_accuracy
from .magnitude import PRUNABLE, _mask_smallest


class SensitivityConfig(StrictModel):
    """What to sweep: sparsities, metric, layers and how much data to evaluate on."""

    sparsities: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    metric: Literal["accuracy", "loss"] = "accuracy"
    scope: Scope = Scope()
    keep_first_last: bool = Field(True, description="leave the first and last layer out, as pruning does")
    norm: Literal["l1", "l2"] = "l1"
    max_batches: int | None = Field(None, ge=1, description="evaluate on at most this many batches")
    batch_size: int = Field(256, ge=1)

    @field_validator("sparsities")
    @classmethod
    def _sorted(cls, v):
        if not v or any(not 0 < s < 1 for s in v):
            raise ValueError(f"give sparsities in (0, 1), got {v}")
        return sorted(set(v))


@dataclass
class SensitivityResult:
    """Metric per layer per sparsity. ``curves[layer][i]`` is the metric at ``sparsities[i]``."""

    metric: str
    baseline: float
    sparsities: list[float]
    curves: dict[str, list[float]]
    sizes: dict[str, int] = field(default_factory=dict)  # weights per layer

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def drops(self) -> dict[str, list[float]]:
        """How much worse than the baseline each point is (positive = worse)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return {n: [sign * (self.baseline - v) for v in c] for n, c in self.curves.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityResult":
        return cls(**d)

    def to_table(self):
        """A rich Table: one row per layer, one column per sparsity."""
        from rich.table import Table

        pct = self.metric == "accuracy"  # accuracy in percent keeps 9+ columns inside 80 characters
        fmt = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")  # noqa: E731
        table = Table(title=f"pruning sensitivity: {self.metric}{' %' if pct else ''} when one layer is pruned "
                            f"(dense {fmt(self.baseline)})")
        table.add_column("layer", no_wrap=True)
        table.add_column("weights", justify="right")
        for s in self.sparsities:
            table.add_column(f"{s:.0%}", justify="right")
        for name, curve in self.curves.items():
            table.add_row(name, f"{self.sizes.get(name, 0):,}", *(fmt(v) for v in curve))
        return table

    def plot(self, path: str | Path) -> Path:
        """Write a PNG with one curve per layer (and the dense baseline) to ``path``."""
        # Figure + Agg canvas directly: never switches the global matplotlib backend of the caller.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.5), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = [0.0] + list(self.sparsities)
        for name, curve in self.curves.items():
            ax.plot(xs, [self.baseline] + list(curve), marker="o", markersize=3, label=name)
        ax.axhline(self.baseline, color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("sparsity of the layer (others dense)")
        ax.set_ylabel(self.metric)
        ax.set_title("per-layer pruning sensitivity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        fig.tight_layout()
        path = Path(path)

        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        return path

    def ratios_for_target(self, target: float) -> dict[str, float]:
        """Per-layer sparsities pruning exactly ``round(target * total)`` weights of the scanned layers.

        Assumes the layers' losses add up. Each layer's drop-vs-pruned-weights curve is made
        monotone and replaced by its lower convex hull; taking hull segments in order of drop
        per pruned weight then minimises the summed drop (exactly, for the convexified curves).
        A layer is never pruned beyond the largest scanned sparsity, whose cost is unknown.
        """
        if not 0 <= target < 1:
            raise ConfigError(f"target sparsity must be in [0, 1), got {target}")
        total = sum(self.sizes[n] for n in self.curves)
        budget = int(round(target * total))
        top = self.sparsities[-1]
        capacity = {n: math.floor(top * self.sizes[n]) for n in self.curves}
        if budget > sum(capacity.values()):
            raise ConfigError(f"target sparsity {target} needs {budget} pruned weights, but the scan only "
                              f"went up to {top:.0%} per layer ({sum(capacity.values())} weights)",
                              hint="scan higher sparsities, e.g. SensitivityConfig(sparsities=[..., 0.95, 0.99])")
        segments = []
        for name, drop in self.drops().items():
            n = self.sizes[name]
            pts, worst = [(0.0, 0.0)], 0.0
            for s, d in zip(self.sparsities, drop):
                worst = max(worst, d)  # more pruning is never assumed to help
                pts.append((s * n, worst))
            hull = _lower_hull(pts)
            for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
                segments.append(((y1 - y0) / (x1 - x0), x0 / n, name, x1 - x0))
        alloc = {n: 0.0 for n in self.curves}
        left = float(budget)
        for _, _, name, width in sorted(segments, key=lambda t: (t[0], t[1])):
            if left <= 0:
                break
            take = min(width, left)
            alloc[name] += take
            left -= take
        counts = _round_to_total(alloc, budget, capacity)
        return {n: counts[n] / self.sizes[n] for n in self.curves}


def _lower_hull(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of points sorted by x (Andrew's monotone chain)."""
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (ox, oy), (ax, ay) = hull[-2], hull[-1]
            if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) > 0:
                break
            hull.pop()
        hull.append(p)
    return hull


def _round_to_total(alloc: dict[str, float], budget: int, capacity: dict[str, int]) -> dict[str, int]:
    """Integer counts summing to ``budget``: floors, then the largest remainders get one more."""
    counts = {n: min(math.floor(a + 1e-9), capacity[n]) for n, a in alloc.items()}
    order = sorted(alloc, key=lambda n: alloc[n] - counts[n], reverse=True)
    short = budget - sum(counts.values())
    while short > 0:
        progressed = False
        for n in order:
            if short and counts[n] < capacity[n]:
                counts[n] += 1
                short -= 1
                progressed = True
        if not progressed:  # pragma: no cover - capacity was checked by the caller
            break
    return counts


@torch.no_grad()
def _mean_loss(model: nn.Module, data, loss_fn: Callable) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in data:
        inputs, target = split_batch(batch)
        n = batch_size_of(inputs)
        total += float(loss_fn(model, inputs, target)) * n
        count += n
    model.train(was_training)
    return total / count


def sensitivity_scan(model: nn.Module, data: Any, config: SensitivityConfig | None = None, *,
                     loss_fn: Callable | None = None) -> SensitivityResult:
    """Sweep each layer's sparsity alone and measure; ``model`` is left exactly as it was.

    ``data`` is labelled evaluation data (anything :class:`~modelpress.core.data.Data`
    accepts); ``loss_fn(model, inputs, target)`` overrides cross-entropy for ``metric="loss"``.
    """
    cfg = config or SensitivityConfig()
    data = as_data(data, batch_size=cfg.batch_size)
    if cfg.max_batches is not None:
        limit = cfg.max_batches if data.limit is None else min(data.limit, cfg.max_batches)
        data = dataclasses.replace(data, limit=limit)  # a copy: the caller's Data keeps its limit
    default_exclude = first_and_last(model, PRUNABLE) if cfg.keep_first_last else []
    layers = cfg.scope.resolve(model, PRUNABLE, default_exclude=default_exclude)

    def measure() -> float:
        if cfg.metric == "accuracy":
            return evaluate_accuracy(model, data)
        return _mean_loss(model, data, loss_fn or classification_loss)

    baseline = measure()
    curves: dict[str, list[float]] = {}
    with progress_bar("sensitivity", total=len(layers) * len(cfg.sparsities)) as advance:
        for name, mod in layers:
            weight = mod.weight
            original = weight.detach().clone()
            scores = original.abs() if cfg.norm == "l1" else original.pow(2)
            curves[name] = []
            try:
                for s in cfg.sparsities:
                    mask = _mask_smallest(scores.reshape(-1), int(round(s * weight.numel())))
                    with torch.no_grad():
                        weight.copy_(original * mask.reshape(weight.shape))
                    curves[name].append(measure())
                    advance(note=f"{name} @ {s:.0%}")
            finally:
                with torch.no_grad():
                    weight.copy_(original)
    return SensitivityResult(metric=cfg.metric, baseline=baseline, sparsities=list(cfg.sparsities),
                             curves=curves, sizes={n: m.weight.numel() for n, m in layers})
