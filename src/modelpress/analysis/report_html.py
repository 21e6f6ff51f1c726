"""One self-contained ``report.html`` per run: the summary table and the plots, opening offline.

Everything is inline: CSS in a ``<style>`` block, figures as base64 PNG ``data:`` URIs, no
scripts and no external URL, so the file can be mailed or archived on its own. Sections:

* the summary table (the same rows as ``report.md``);
* quality vs artifact size, and vs latency when latency was measured: the baseline, every
  stage, and the Pareto front (points no other point beats on both axes) drawn as a line;
* per-layer bars for each stage whose method reported per-layer sparsity, bit-width, rank
  or kept channels;
* per-layer pruning sensitivity curves, when a sensitivity result is given.

A missing measurement leaves its plot out with a one-line note. The trade-off plot takes
generic :class:`TradeoffPoint` objects, so a search can draw hundreds of trials the same way.

    >>> import tempfile
    >>> rows = [{"label": "baseline", "accuracy": 0.98, "artifact_bytes": 250_000},
    ...         {"label": "pruned", "accuracy": 0.97, "artifact_bytes": 60_000}]
    >>> infos = [{"stage": "pruned", "method": "prune.magnitude", "layer_sparsity": {"fc1": 0.8, "fc2": 0.6}}]
    >>> path = write_html_report(tempfile.mkdtemp(), "demo", rows, infos)
    >>> html = path.read_text(); "data:image/png;base64," in html and "https://" not in html
    True
    >>> [p.label for p in pareto_front([TradeoffPoint("a", 0.9, 10), TradeoffPoint("b", 0.8, 20),
    ...                                  TradeoffPoint("c", 0.95, 30)])]
    ['a', 'c']
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..core.io import write_text
from .tables import format_bytes, format_ms, row_cell, row_columns, speedup_of

QUALITY_KEYS = ("accuracy", "spearman", "fidelity")  # all higher-is-better, in order of preference
_COSTS = {"size": "size on disk", "latency": "latency"}


@dataclass(frozen=True)
class TradeoffPoint:
    """One model on a quality-vs-cost plot: a run's baseline or stage, or a search trial.

    ``quality`` is higher-is-better; ``size`` is bytes and ``latency`` milliseconds (both
    lower-is-better, ``None`` when not measured). ``kind`` is ``"baseline"``, ``"stage"``
    (labelled on the plot) or ``"trial"`` (a dot, unlabelled, for long lists).
    """

    label: str
    quality: float | None
    size: float | None = None
    latency: float | None = None
    kind: str = "stage"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: Iterable[TradeoffPoint], cost: str = "size") -> list[TradeoffPoint]:
    """The non-dominated points, cheapest first: no other point has quality >= and cost <=
    with one of them strictly better. Points missing quality or ``cost`` are ignored; exact
    duplicates of a front point are all kept."""
    if cost not in _COSTS:
        raise ValueError(f"cost must be one of {sorted(_COSTS)}, got {cost!r}")
    valid = [p for p in points if _finite(p.quality) and _finite(getattr(p, cost))]
    valid.sort(key=lambda p: (getattr(p, cost), -p.quality))
    front: list[TradeoffPoint] = []
    for p in valid:  # cheapest first: a point is on the front iff it beats every cheaper one
        if not front or p.quality > front[-1].quality:
            front.append(p)
        elif p.quality == front[-1].quality and getattr(p, cost) == getattr(front[-1], cost):
            front.append(p)
    return front


def quality_key(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The quality metric the rows carry (``accuracy``, else ``spearman``, else ``fidelity``)."""
    return next((k for k in QUALITY_KEYS if any(_finite(r.get(k)) for r in rows)), None)


def latency_key(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """``(row key, header)`` of the latency to plot: the first latency column of the table
    (PyTorch eager before ONNX Runtime, smallest batch first), or ``None``."""
    return next(((k, h) for k, h, kind in row_columns(list(rows)) if kind == "ms"), None)


def points_from_rows(rows: Sequence[Mapping[str, Any]], quality: str | None = None) -> list[TradeoffPoint]:
    """Report rows (first = baseline) as trade-off points."""
    quality = quality or quality_key(rows)
    lat = latency_key(rows)
    return [TradeoffPoint(label=str(r.get("label", i)), quality=r.get(quality) if quality else None,
                          size=r.get("artifact_bytes", r.get("dense_bytes")),
                          latency=r.get(lat[0]) if lat else None, kind="baseline" if i == 0 else "stage")
            for i, r in enumerate(rows)]


# -- figures ---------------------------------------------------------------------------------
def _figure(width: float, height: float):
    # Figure + Agg canvas directly: never touches pyplot or the caller's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def tradeoff_figure(points: Sequence[TradeoffPoint], cost: str = "size", quality_label: str = "accuracy",
                    cost_label: str | None = None):
    """Quality vs ``cost`` (``"size"`` or ``"latency"``): baseline star, labelled stages, trial
    dots, and the Pareto front as a dashed line. Returns a matplotlib ``Figure``."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, PercentFormatter

    pts = [p for p in points if _finite(p.quality) and _finite(getattr(p, cost))]
    fig = _figure(5.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    trials = [p for p in pts if p.kind == "trial"]
    if trials:
        ax.scatter([getattr(p, cost) for p in trials], [p.quality for p in trials], s=12, color="#9aa5b1",
                   alpha=0.7, label="trials", zorder=2)
    front = pareto_front(pts, cost)
    if len(front) > 1:
        ax.plot([getattr(p, cost) for p in front], [p.quality for p in front], "--", color="#d9480f",
                linewidth=1.5, label="Pareto front", zorder=3)
    for p in front:
        ax.scatter(getattr(p, cost), p.quality, s=110, facecolors="none", edgecolors="#d9480f", zorder=4)
    stages = [p for p in pts if p.kind == "stage"]
    if stages:
        ax.scatter([getattr(p, cost) for p in stages], [p.quality for p in stages], s=36, color="#1971c2",
                   label="stages", zorder=5)
    for i, p in enumerate(q for q in pts if q.kind != "trial"):
        if p.kind == "baseline":
            ax.scatter(getattr(p, cost), p.quality, s=160, marker="*", color="#2b8a3e", label="baseline", zorder=6)
        # labels alternate above / below, so neighbours with equal quality do not overprint
        ax.annotate(p.label, (getattr(p, cost), p.quality), textcoords="offset points",
                    xytext=(6, 5 if i % 2 == 0 else -12), fontsize=8)
    values = [getattr(p, cost) for p in pts]
    if values and min(values) > 0 and max(values) / min(values) > 8:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(5))  # byte / ms labels are wide
    fmt = format_bytes if cost == "size" else format_ms
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.margins(0.12)  # room for the labels of the extreme points
    if quality_label == "accuracy":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(cost_label or _COSTS[cost])
    ax.set_ylabel(quality_label)
    ax.set_title(f"{quality_label} vs {cost_label or _COSTS[cost]} (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return fig


def per_layer_series(info: Mapping[str, Any]) -> list[tuple[str, dict[str, list[float]]]]:
    """What a stage's method info says per layer, as ``[(quantity, {layer: [values]})]``.

    Understands ``layer_sparsity`` (pruning), ``layers`` as a dict or a list of rows with
    ``bits`` / ``weight_bits`` (quantization) or ``rank`` (low-rank; Tucker gives two ranks),
    and ``groups`` with ``channels: [before, after]`` (channel pruning).
    """
    series: list[tuple[str, dict[str, list[float]]]] = []
    sparsity = info.get("layer_sparsity")
    if isinstance(sparsity, Mapping) and sparsity:
        series.append(("sparsity", {str(n): [float(v)] for n, v in sparsity.items() if _finite(v)}))
    layers = info.get("layers")
    if isinstance(layers, Mapping):
        entries = [(str(n), e) for n, e in layers.items() if isinstance(e, Mapping)]
    elif isinstance(layers, list):
        entries = [(str(e.get("layer", i)), e) for i, e in enumerate(layers) if isinstance(e, Mapping)]
    else:
        entries = []
    bits = {n: [float(e.get("bits", e.get("weight_bits")))] for n, e in entries
            if _finite(e.get("bits", e.get("weight_bits")))}
    if bits:
        series.append(("bit-width", bits))
    ranks = {}
    for n, e in entries:
        r = e.get("rank")
        r = [r] if _finite(r) else r if isinstance(r, list) and all(_finite(v) for v in r) and r else None
        if r is not None:
            ranks[n] = [float(v) for v in r]
    if ranks:
        series.append(("rank", ranks))
    groups = info.get("groups")
    if isinstance(groups, list):
        kept = {}
        for g in groups:
            ch = g.get("channels") if isinstance(g, Mapping) else None
            if isinstance(ch, list) and len(ch) == 2 and all(_finite(v) for v in ch) and ch[0]:
                kept[", ".join(map(str, g.get("layers") or ["?"]))] = [1.0 - ch[1] / ch[0]]
        if kept:
            series.append(("channels removed", kept))
    return [(q, values) for q, values in series if values]


def layer_bars_figure(title: str, quantity: str, values: Mapping[str, Sequence[float]]):
    """Horizontal bars, one per layer (grouped when a layer has several values, e.g. Tucker ranks)."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    names = list(values)
    width = max(len(v) for v in values.values())
    fig = _figure(5.4, min(1.4 + 0.24 * len(names) * max(1, width * 0.7), 40))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / width
    legend = ["out", "in"] if width == 2 else [f"#{j + 1}" for j in range(width)]
    for j in range(width):
        ys = [i + (j - (width - 1) / 2) * height for i in range(len(names))]
        xs = [values[n][j] if j < len(values[n]) else 0.0 for n in names]
        ax.barh(ys, xs, height=height * 0.95, color=["#1971c2", "#f08c00", "#2b8a3e", "#ae3ec9"][j % 4],
                label=legend[j] if width > 1 else None)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()  # first layer on top, as in the model
    if quantity in ("sparsity", "channels removed"):
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    else:  # bits and ranks are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(quantity)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if width > 1:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return fig


def sensitivity_figure(sensitivity: Any):
    """Per-layer sensitivity curves from a ``SensitivityResult`` or its ``to_dict()``."""
    from matplotlib.ticker import PercentFormatter

    s = sensitivity if isinstance(sensitivity, Mapping) else sensitivity.to_dict()
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    xs = [0.0] + [float(v) for v in s["sparsities"]]
    for name, curve in s["curves"].items():
        ax.plot(xs, [s["baseline"]] + list(curve), marker="o", markersize=3, label=name)
    ax.axhline(s["baseline"], color="grey", linestyle="--", linewidth=1, label="dense")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if s["metric"] == "accuracy":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("sparsity of the layer (others dense)")
    ax.set_ylabel(s["metric"])
    ax.set_title("per-layer pruning sensitivity")
    ax.grid(alpha=0.3)
    if len(s["curves"]) <= 20:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return fig


# -- HTML ------------------------------------------------------------------------------------
CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px auto; max-width: 1240px; color: #212529;
       background: #ffffff; padding: 0 16px; }
h1 { font-size: 1.6em; border-bottom: 3px solid #495057; padding-bottom: 6px; }
h2 { font-size: 1.25em; margin-top: 32px; color: #343a40; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.9em; }
th, td { border: 1px solid #ced4da; padding: 5px 10px; text-align: right; white-space: nowrap; }
th { background: #e7f5ff; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #f8f9fa; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; } img { max-width: 100%; border: 1px solid #dee2e6; }
.note { color: #868e96; font-style: italic; }
"""


def _img(fig, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def rows_table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``report.md`` table as HTML: one row per model, baseline first, ratios vs the baseline."""
    cols = row_columns(list(rows))
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
    body = "".join("<tr>" + "".join(
        f"<td>{html.escape(row_cell(r.get(k), rows[0].get(k), kind, speedup_of(dict(r), k)))}</td>"
        for k, _, kind in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tradeoff_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    quality = quality_key(rows)
    if quality is None:
        return [_note("No quality metric (accuracy, spearman) was measured, so there are no trade-off plots.")]
    points = points_from_rows(rows, quality)
    plots, notes = [], []
    size_label = "size on disk" if any(_finite(r.get("artifact_bytes")) for r in rows) else "dense size"
    if sum(_finite(p.size) for p in points) >= 1:
        plots.append(_img(tradeoff_figure(points, "size", quality, size_label), f"{quality} vs size"))
    else:
        notes.append("Size was not measured, so there is no quality-vs-size plot.")
    lat = latency_key(rows)
    if lat and sum(_finite(p.latency) for p in points) >= 1:
        plots.append(_img(tradeoff_figure(points, "latency", quality, f"{lat[1]} latency"), f"{quality} vs latency"))
        if any(speedup_of(dict(r), lat[0]) is not None for r in rows):
            notes.append("The latency plot uses each row's median as measured; the table's ratios come from "
                         "timing each stage interleaved with the baseline and are the fairer comparison.")
    else:
        notes.append("Latency was not measured (eval.latency is off), so there is no quality-vs-latency plot.")
    return [f'<div class="plots">{"".join(plots)}</div>', *map(_note, notes)]


def _layers_section(infos: Sequence[Mapping[str, Any]]) -> list[str]:
    parts = []
    for i, info in enumerate(infos):
        stage = f"stage {i + 1} {info.get('stage', '')} ({info.get('method', '?')})"
        for quantity, values in per_layer_series(info):
            parts.append(_img(layer_bars_figure(f"{stage}: {quantity} per layer", quantity, values),
                              f"{stage} {quantity} per layer"))
    if not parts:
        return [_note("No stage reported per-layer sparsity, bit-width or rank.")]
    return [f'<div class="plots">{"".join(parts)}</div>']


def _sensitivity_section(sensitivity: Any) -> list[str]:
    s = sensitivity if isinstance(sensitivity, Mapping) else sensitivity.to_dict()
    parts = [_img(sensitivity_figure(s), "per-layer sensitivity curves")]
    pct = s["metric"] == "accuracy"
    cell = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.4f}")  # noqa: E731
    head = "<th>layer</th><th>weights</th>" + "".join(f"<th>{100 * v:.0f}%</th>" for v in s["sparsities"])
    body = "".join(f"<tr><td>{html.escape(str(n))}</td><td>{s.get('sizes', {}).get(n, 0):,}</td>"
                   + "".join(f"<td>{cell(v)}</td>" for v in c) + "</tr>" for n, c in s["curves"].items())
    parts.append(f"<p>{html.escape(s['metric'])} of the dense model: {cell(s['baseline'])}</p>"
                 f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    target = s.get("ratios_for_target")
    if target:
        rows = "".join(f"<tr><td>{html.escape(str(n))}</td><td>{v:.3f}</td></tr>"
                       for n, v in target["layer_sparsity"].items())
        parts.append(f"<h3>Per-layer sparsity for {100 * target['target']:.0f}% overall</h3>"
                     f"<table><thead><tr><th>layer</th><th>sparsity</th></tr></thead><tbody>{rows}</tbody></table>")
    return parts


def render_html(recipe_name: str, rows: Sequence[Mapping[str, Any]], infos: Sequence[Mapping[str, Any]],
                sensitivity: Any = None, description: str = "") -> str:
    """The report as one HTML string (see :func:`write_html_report`)."""
    title = f"modelpress report: {recipe_name}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    if description:
        body.append(f"<p>{html.escape(description)}</p>")
    if rows:
        body += ["<h2>Summary</h2>", rows_table_html(rows),
                 _note("Baseline = first row; ratios are baseline / row for sizes, MACs and latency "
                       "(higher is better).")]
        if infos:
            items = "".join(f"<li>{html.escape(str(s.get('stage', i + 1)))}: "
                            f"<code>{html.escape(str(s.get('method', '?')))}</code></li>" for i, s in enumerate(infos))
            body.append(f"<p>Stages:</p><ul>{items}</ul>")
        body += ["<h2>Quality vs cost</h2>", *_tradeoff_section(rows),
                 "<h2>Per-layer view</h2>", *_layers_section(infos)]
    if sensitivity is not None:
        body += ["<h2>Pruning sensitivity</h2>", *_sensitivity_section(sensitivity)]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_html_report(out_dir: str | Path, recipe_name: str, rows: Sequence[Mapping[str, Any]],
                      infos: Sequence[Mapping[str, Any]], sensitivity: Any = None, description: str = "") -> Path:
    """Write ``out_dir/report.html`` atomically and return its path.

    ``rows``: report rows, baseline first (what ``report.json`` holds under ``rows``);
    ``infos``: one method-info dict per stage (``report.json``'s ``stages``);
    ``sensitivity``: a :class:`~modelpress.pruning.sensitivity.SensitivityResult` or its dict.
    """
    return write_text(Path(out_dir) / "report.html", render_html(recipe_name, rows, infos, sensitivity, description))


def render_search_html(doc: Mapping[str, Any]) -> str:
    """A search's page: quality vs cost of every trial (baseline star, best trial labelled,
    Pareto front dashed) and the front as a table; ``doc`` is what ``trials.json`` holds."""
    budget, base = doc["budget"], doc.get("baseline", {})
    metric = budget["metric"]
    field = "latency" if metric == "latency" else "size"
    best_no = (doc.get("best") or {}).get("number")
    points = [TradeoffPoint("baseline", doc.get("baseline_quality"), kind="baseline",
                            **{field: _baseline_cost(base, budget)})]
    done = [t for t in doc["trials"] if t.get("state") == "COMPLETE"]
    for t in done:
        points.append(TradeoffPoint(f"best (trial {t['number']})" if t["number"] == best_no else str(t["number"]),
                                    t["quality"], kind="stage" if t["number"] == best_no else "trial",
                                    **{field: t["cost"]}))
    title = "modelpress search"
    verdict = ("meets the budget" if doc.get("met_budget") else "does NOT meet the budget (closest shown)")
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>Budget: {html.escape(metric)} &le; {budget['limit']:,g}, quality drop &le; {budget['max_drop']:g} "
            f"points. {len(done)} completed trial(s) of {len(doc['trials'])}. Best: "
            f"{'none' if best_no is None else f'trial {best_no}, which {verdict}'}.</p>"]
    if done:
        label = {"bytes": "artifact bytes", "macs": "MACs per sample", "latency": "latency (ms)"}[metric]
        body.append(_img(tradeoff_figure(points, cost=field, quality_label="quality (points)", cost_label=label),
                         f"quality vs {metric} of every trial"))
        front = set(doc.get("pareto", []))
        head = "<tr><th>trial</th><th>quality</th><th>drop (pt)</th><th>" + html.escape(label) + \
               "</th><th>within budget</th><th>choices</th></tr>"
        rows = "".join(
            f"<tr><td>{t['number']}{' (best)' if t['number'] == best_no else ''}</td><td>{t['quality']:.2f}</td>"
            f"<td>{t['drop']:+.2f}</td><td>{t['cost']:,.4g}</td><td>{'yes' if t.get('feasible') else 'no'}</td>"
            f"<td>{html.escape(', '.join(f'{k}={v}' for k, v in sorted(t['params'].items())))}</td></tr>"
            for t in sorted(done, key=lambda t: t["cost"]) if t["number"] in front)
        body += ["<h2>Pareto front</h2>", f"<table>{head}{rows}</table>"]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _baseline_cost(base: Mapping[str, Any], budget: Mapping[str, Any]) -> float | None:
    if budget["metric"] == "latency":
        key = f"{'eager' if budget.get('runtime', 'eager') == 'eager' else 'ort'}_b{budget.get('batch_size', 1)}_ms"
    else:
        key = {"bytes": "artifact_bytes", "macs": "macs"}[budget["metric"]]
    return base.get(key)


__all__ = ["TradeoffPoint", "figure_png", "layer_bars_figure", "pareto_front", "per_layer_series", "points_from_rows",
           "quality_key", "render_html", "render_search_html", "rows_table_html", "sensitivity_figure",
           "tradeoff_figure",
           "write_html_report"]
