"""Render analysis reports as a rich table, Markdown or JSON, alone or side by side.

Units: bytes in decimal KB/MB/GB (1 KB = 1000 B), MACs and parameter counts with K/M/G
suffixes, latency as ``median ms [p10-p90]``.

Example::

    >>> rows = [{"label": "dense", "artifact_bytes": 4_000_000, "eager_b1_ms": 2.0},
    ...         {"label": "pruned", "artifact_bytes": 1_000_000, "eager_b1_ms": 1.0}]
    >>> print(compare_rows(rows))
    | model | size on disk | torch b1 |
    |---|---|---|
    | dense | 4.00 MB (1.00x) | 2.00 ms (1.00x) |
    | pruned | 1.00 MB (4.00x) | 1.00 ms (2.00x) |
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable, Mapping, Sequence

from rich.table import Table

from ..runtime import label_of
from .analyze import AnalysisReport

Reports = AnalysisReport | Mapping[str, AnalysisReport] | Sequence[Any]
DASH = "-"


# -- units ---------------------------------------------------------------------------------
def _scaled(value: float, units: Sequence[str], base: float) -> tuple[float, str]:
    i = 0
    while abs(value) >= base and i < len(units) - 1:
        value /= base
        i += 1
    return value, units[i]


def format_bytes(n: float | None) -> str:
    """``1_234_567`` -> ``'1.23 MB'`` (decimal units)."""
    if n is None:
        return DASH
    value, unit = _scaled(float(n), ["B", "KB", "MB", "GB", "TB"], 1000.0)
    return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"


def format_count(n: float | None, suffix: str = "") -> str:
    """``416_520`` -> ``'416.5 K'``; ``suffix`` is appended (``'416.5 K MACs'``)."""
    if n is None:
        return DASH
    value, unit = _scaled(float(n), ["", "K", "M", "G", "T"], 1000.0)
    number = f"{int(value)}" if unit == "" else f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}"
    return " ".join(part for part in (number, unit, suffix) if part)


def _decimals(ms: float) -> int:
    """Decimals that show three significant digits of ``ms`` (0.0637 -> 4, 2.86 -> 2)."""
    return max(0, 2 - math.floor(math.log10(abs(ms)))) if ms else 3


def format_ms(ms: float | None) -> str:
    """Milliseconds with three significant digits: ``0.1653`` -> ``'0.165 ms'``."""
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return DASH
    return f"{ms:.{_decimals(ms)}f} ms" if ms < 1000 else f"{ms / 1000:.3g} s"


def _format_latency(entry: Mapping[str, Any] | None) -> str:
    """``median ms [p10-p90]``, the spread printed at the median's precision."""
    if entry is None:
        return DASH
    d = _decimals(entry["median_ms"])
    return f"{format_ms(entry['median_ms'])} [{entry['p10_ms']:.{d}f}-{entry['p90_ms']:.{d}f}]"


# -- report rows ---------------------------------------------------------------------------
def _labelled(reports: Reports) -> list[tuple[str, AnalysisReport]]:
    if isinstance(reports, AnalysisReport):
        return [(reports.model, reports)]
    if isinstance(reports, Mapping):
        return list(reports.items())
    out = []
    for item in reports:
        out.append((item.model, item) if isinstance(item, AnalysisReport) else (item[0], item[1]))
    return out


def _latency_keys(reports: Iterable[AnalysisReport]) -> list[tuple[str, int]]:
    keys: list[tuple[str, int]] = []
    for report in reports:
        for entry in report.latency:
            key = (entry["engine"], entry["batch_size"])
            if key not in keys:
                keys.append(key)
    return keys


def _entry(report: AnalysisReport, engine: str, batch_size: int) -> Mapping[str, Any] | None:
    return next((e for e in report.latency if e["engine"] == engine and e["batch_size"] == batch_size),
                None)


def report_rows(reports: Reports) -> tuple[list[str], list[list[str]]]:
    """``(column labels, rows)``; each row is ``[metric, value per report...]``."""
    labelled = _labelled(reports)
    items = [r for _, r in labelled]

    def row(metric: str, fn) -> list[str]:
        return [metric] + [fn(r) for r in items]

    rows = [
        row("Parameters", lambda r: format_count(r.params_total)),
        row("Non-zero parameters",
            lambda r: f"{format_count(r.params_nonzero)} ({100 * r.sparsity:.1f}% sparse)"),
        row("Dense size (state_dict)", lambda r: format_bytes(r.dense_bytes)),
        row("Artifact size", lambda r: format_bytes(r.artifact_bytes)),
        row("MACs / sample", lambda r: format_count(r.macs_total, "MACs")),
        row("Effective MACs / sample", lambda r: format_count(r.macs_effective, "MACs")),
        row("Peak activation memory", lambda r: f"{format_bytes(r.memory.get('peak_activation_bytes'))}"
            + (f" (batch {r.memory_batch_size})" if r.memory else "")),
        row("ONNX size", lambda r: format_bytes(r.onnx_bytes)),
        row("ONNX max abs diff",
            lambda r: DASH if r.onnx_max_abs_diff is None else f"{r.onnx_max_abs_diff:.2g}"),
    ]
    for engine, bs in _latency_keys(items):
        threads = next((e["threads"] for r in items for e in r.latency
                        if (e["engine"], e["batch_size"]) == (engine, bs)), None)
        label = f"Latency {label_of(engine)}, batch {bs}" + (f", {threads} thr" if threads else "")
        rows.append(row(label, lambda r, e=engine, b=bs: _format_latency(_entry(r, e, b))))
    if any(r.errors for r in items):
        rows.append(row("Errors", lambda r: "; ".join(f"{k}: {v}" for k, v in r.errors.items()) or DASH))
    rows = [r for r in rows if any(cell != DASH for cell in r[1:])]  # nothing measured anywhere
    return [label for label, _ in labelled], rows


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(reports: Reports) -> str:
    """Markdown table, one column per report (``{"baseline": r1, "pruned": r2}`` or ``[r]``)."""
    labels, rows = report_rows(reports)
    return _markdown(["Metric", *labels], rows)


def to_rich_table(reports: Reports, title: str | None = "Model analysis") -> Table:
    """A ``rich.table.Table`` of the same rows (print it with ``rich.print``)."""
    labels, rows = report_rows(reports)
    table = Table(title=title)
    table.add_column("Metric", style="bold")
    for label in labels:
        table.add_column(label, justify="right")
    for r in rows:
        table.add_row(*r)
    return table


def to_json(reports: Reports, indent: int | None = 2) -> str:
    """JSON text: one report's dict, or ``{label: dict}`` for several."""
    if isinstance(reports, AnalysisReport):
        return json.dumps(reports.to_dict(), indent=indent)
    return json.dumps({label: r.to_dict() for label, r in _labelled(reports)}, indent=indent)


def macs_by_layer_markdown(report: AnalysisReport, top: int | None = 10) -> str:
    """The layers with the most MACs, with their share of the total."""
    items = sorted(report.macs_by_layer.items(), key=lambda kv: -kv[1])[:top]
    total = report.macs_total or 1
    return _markdown(["Layer", "MACs", "Share"],
                     [[name, format_count(m), f"{100 * m / total:.1f}%"] for name, m in items])


# -- before / after ------------------------------------------------------------------------
# (key, header, kind): kinds "bytes", "count", "ms" are lower-is-better and get a ratio
# baseline / row; latency columns are found from the keys (eager_b{N}_ms, ort_b{N}_ms, ov_..., litert_...).
ROW_COLUMNS = [
    ("label", "model", "text"), ("accuracy", "accuracy", "pct"), ("spearman", "spearman", "float"),
    ("fidelity", "fidelity", "float"), ("perplexity", "perplexity", "float"), ("token_accuracy", "token acc.", "pct"),
    ("artifact_bytes", "size on disk", "bytes"),
    ("params", "params", "count"), ("nonzero", "non-zero", "count"), ("macs", "MACs", "count"),
    ("effective_macs", "sparse MACs", "count"), ("peak_bytes", "peak mem", "bytes"),
]
_LATENCY_KEY = re.compile(r"([a-z]+)_b(\d+)_ms")
#: report-column prefix -> header (a runtime registered later shows under its own key)
_ENGINE_HEADERS = {"eager": "torch", "ort": "ORT", "ov": "OpenVINO", "litert": "LiteRT"}


def row_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    cols = [c for c in ROW_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    latency = {_LATENCY_KEY.fullmatch(k).groups(): k for r in rows for k in r if _LATENCY_KEY.fullmatch(k)}
    order = list(_ENGINE_HEADERS)
    for (engine, bs), key in sorted(latency.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order
                                                                      else len(order), kv[0][0], int(kv[0][1]))):
        cols.append((key, f"{_ENGINE_HEADERS.get(engine, engine)} b{bs}", "ms"))
    return cols


def row_cell(value: Any, base: Any, kind: str, ratio: float | None = None) -> str:
    """One cell; ``ratio`` (e.g. an interleaved speed-up) replaces ``base / value`` when given."""
    if value is None:
        return DASH
    if kind == "text":
        return str(value)
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "float":
        return f"{value:.4f}"
    text = {"bytes": format_bytes, "ms": format_ms}.get(kind, format_count)(value)
    if ratio is not None:
        text += f" ({ratio:.2f}x)"
    elif isinstance(base, (int, float)) and base and value:
        text += f" ({base / value:.2f}x)"
    return text


def speedup_of(row: dict[str, Any], key: str) -> float | None:
    """The measured speed-up stored next to a latency key (``eager_b64_ms`` -> ``eager_b64_speedup``)."""
    return row.get(key[:-3] + "_speedup") if key.endswith("_ms") else None


def compare_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown table with one row per model, the first row being the baseline.

    Row keys: ``label``, quality (``accuracy`` as a fraction, ``spearman``, ``fidelity``),
    ``artifact_bytes``, ``params``, ``nonzero``, ``macs``, ``effective_macs``, ``peak_bytes``
    and latencies ``eager_b{N}_ms`` / ``ort_b{N}_ms`` (what :meth:`AnalysisReport.summary`
    returns). Size, count and latency cells carry ``(baseline / value)x``: higher is better.
    """
    if not rows:
        return ""
    cols = row_columns(rows)
    table = [[row_cell(r.get(key), rows[0].get(key), kind, speedup_of(r, key)) for key, _, kind in cols]
             for r in rows]
    return _markdown([header for _, header, _ in cols], table) + (
        "\n\nLatency ratios of compressed rows are measured interleaved with the baseline in one process."
        if any(speedup_of(r, k) is not None for r in rows for k, _, _ in cols) else "")



def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a and b else None


def explain_rows(rows: list[dict[str, Any]], quality: Sequence[str] = ("accuracy",)) -> list[str]:
    """One line per compressed row saying *why* its numbers moved, from the numbers themselves:
    fewer MACs (work removed) is what makes a model faster on dense kernels; fewer parameters,
    zeros stored sparsely or fewer bits per weight make the file smaller without touching speed.

        >>> base = {"label": "baseline", "accuracy": 0.98, "artifact_bytes": 300_000, "params": 80_000,
        ...         "nonzero": 80_000, "macs": 9_000_000}
        >>> pruned = {"label": "channels", "accuracy": 0.975, "artifact_bytes": 160_000, "params": 40_000,
        ...           "nonzero": 40_000, "macs": 4_000_000, "ort_b64_ms": 1.0, "ort_b64_speedup": 1.8}
        >>> print(explain_rows([base, pruned])[0].replace("; ", ";\\n"))
        channels: 2.25x fewer MACs (work removed): 1.80x faster (ORT b64);
        1.88x smaller on disk (2.00x fewer parameters);
        accuracy -0.50 pt
    """
    out = []
    for prev, row in zip(rows, rows[1:]):
        parts = []
        macs = _ratio(prev.get("macs"), row.get("macs"))
        speeds = {header: speedup_of(row, key) for key, header, kind in row_columns(rows)
                  if kind == "ms" and speedup_of(row, key) is not None}
        best = max(speeds.items(), key=lambda kv: kv[1]) if speeds else None
        if macs and macs > 1.01:
            parts.append(f"{macs:.2f}x fewer MACs (work removed)"
                         + (f": {best[1]:.2f}x faster ({best[0]})" if best else ""))
        elif best:
            parts.append(f"same MACs as {prev['label']}: dense kernels do the same work "
                         f"(best latency ratio to the baseline {best[1]:.2f}x, {best[0]})")
        size = _ratio(prev.get("artifact_bytes"), row.get("artifact_bytes"))
        if size and size > 1.01:
            params = _ratio(prev.get("params"), row.get("params"))
            nonzero = _ratio(prev.get("nonzero"), row.get("nonzero"))
            if params and params > 1.01:
                why = f"{params:.2f}x fewer parameters"
            elif nonzero and nonzero > 1.01:
                why = f"{nonzero:.2f}x fewer non-zero weights, stored sparsely"
            else:
                why = "fewer bits per weight"
            parts.append(f"{size:.2f}x smaller on disk ({why})")
        base = rows[0]
        for key in quality:
            if row.get(key) is not None and base.get(key) is not None:
                delta = row[key] - base[key]
                parts.append(f"{key} {100 * delta:+.2f} pt" if key == "accuracy" else f"{key} {delta:+.4f}")
        if parts:
            out.append(f"{row.get('label', '?')}: " + "; ".join(parts))
    return out
