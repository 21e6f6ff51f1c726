"""analyze(): the combined report, its JSON / Markdown / rich renderings, and peak memory."""
from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from modelpress.analysis.analyze import AnalysisReport, analyze, resize_batch
from modelpress.analysis.memory import peak_memory
from modelpress.analysis.tables import (
    compare_rows,
    format_bytes,
    format_count,
    format_ms,
    macs_by_layer_markdown,
    to_json,
    to_markdown,
    to_rich_table,
)
from modelpress.core.errors import DataError


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def lenet_reports():
    torch.manual_seed(0)
    base = LeNet5()
    pruned = LeNet5()
    pruned.load_state_dict(base.state_dict())
    with torch.no_grad():
        pruned.fc1.weight[:60] = 0
    example = torch.randn(2, 1, 28, 28)
    kwargs = dict(batch_sizes=(1, 4), repeats=3, warmup=1)
    return (analyze(base, example, artifact_bytes=123_456, **kwargs),
            analyze(pruned, example, onnx=False, **kwargs))


def test_analyze_lenet5(lenet_reports):
    report, pruned = lenet_reports
    assert report.errors == {}
    assert report.params_total == report.params_nonzero == 61_706
    assert report.dense_bytes == 4 * 61_706 and report.artifact_bytes == 123_456
    assert report.macs_total == report.macs_effective == 416_520  # per sample, not per batch
    assert report.macs_by_layer["conv2"] == 240_000
    assert report.memory_batch_size == 4 and report.memory["peak_activation_bytes"] > 0
    assert report.onnx_bytes > 4 * 61_706 * 0.9 and report.onnx_max_abs_diff < 1e-4
    assert {(e["engine"], e["batch_size"]) for e in report.latency} == {
        ("eager", 1), ("onnxruntime", 1), ("eager", 4), ("onnxruntime", 4)}
    assert all(e["median_ms"] > 0 and e["threads"] == 1 for e in report.latency)
    assert pruned.macs_effective == 416_520 - 24_000
    assert pruned.params_nonzero == 61_706 - 24_000
    assert [e["engine"] for e in pruned.latency] == ["eager", "eager"]
    summary = report.summary()
    assert summary["macs"] == 416_520 and summary["ort_b4_ms"] == report.latency_ms("onnxruntime", 4)


def test_json_round_trip(lenet_reports):
    report = lenet_reports[0]
    data = json.loads(to_json(report))
    assert data == json.loads(json.dumps(report.to_dict()))
    assert AnalysisReport.from_dict(data).to_dict() == report.to_dict()
    both = json.loads(to_json({"baseline": lenet_reports[0], "pruned": lenet_reports[1]}))
    assert set(both) == {"baseline", "pruned"}


def test_markdown_and_rich_side_by_side(lenet_reports):
    md = to_markdown({"baseline": lenet_reports[0], "pruned": lenet_reports[1]})
    lines = md.splitlines()
    assert lines[0] == "| Metric | baseline | pruned |"
    for header in ("| Parameters |", "| MACs / sample | 416.5 K MACs | 416.5 K MACs |",
                   "| Effective MACs / sample | 416.5 K MACs | 392.5 K MACs |",
                   "| Latency PyTorch eager, batch 1, 1 thr |", "| Latency ONNX Runtime, batch 4, 1 thr |",
                   "| Artifact size | 123.46 KB | - |"):
        assert any(line.startswith(header) for line in lines), header
    assert all(line.count("|") == 4 for line in lines)

    table = to_rich_table([("baseline", lenet_reports[0])], title="LeNet-5")
    assert isinstance(table, Table) and len(table.columns) == 2
    console = Console(record=True, width=200)
    console.print(table)
    assert "MACs / sample" in console.export_text()
    assert "| conv2 | 240.0 K | 57.6% |" in macs_by_layer_markdown(lenet_reports[0])


def test_failing_parts_are_recorded_not_raised():
    class NoExport(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if torch.jit.is_tracing() or torch.compiler.is_exporting():
                raise RuntimeError("not exportable")
            return self.fc(x)

    report = analyze(NoExport(), torch.randn(2, 4), batch_sizes=(2,), repeats=2, warmup=0)
    assert "onnx" in report.errors and "not exportable" in report.errors["onnx"]
    assert report.macs_total == 8 and report.latency_ms("eager", 2) > 0
    assert "Errors" in to_markdown(report)

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("wrong input")

    with pytest.raises(DataError, match="cannot run"):
        analyze(Broken(), torch.randn(2, 4))


def test_resize_batch_for_dicts_and_tensors():
    inputs = {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3)}
    five = resize_batch(inputs, 5)
    assert five["input_ids"].shape == (5, 3) and five["attention_mask"].shape == (5, 3)
    assert five["input_ids"][2].tolist() == [0, 1, 2]  # repeated cyclically
    assert resize_batch(torch.randn(8, 2), 3).shape == (3, 2)


def test_peak_memory_is_plausible():
    # one Linear(1000, 1000) on 64 rows allocates exactly its 64x1000 fp32 output
    mem = peak_memory(nn.Linear(1000, 1000), torch.randn(64, 1000))
    assert mem["peak_activation_bytes"] == 64 * 1000 * 4
    assert mem["param_bytes"] == (1000 * 1000 + 1000) * 4
    assert mem["peak_total_bytes"] == mem["param_bytes"] + mem["input_bytes"] + 256_000
    # Linear -> ReLU (not in place) -> Linear: two 64x1000 tensors are alive at the peak
    mlp = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU())
    assert peak_memory(mlp, torch.randn(64, 1000))["peak_activation_bytes"] == 2 * 256_000


def test_units_and_compare_rows():
    assert format_bytes(999) == "999 B" and format_bytes(1_234_567) == "1.23 MB"
    assert format_count(416_520, "MACs") == "416.5 K MACs" and format_count(840) == "840"
    assert format_ms(0.16526) == "0.165 ms"
    md = compare_rows([{"label": "dense", "accuracy": 0.981, "params": 61_706, "ort_b1_ms": 0.2},
                       {"label": "pruned", "accuracy": 0.979, "params": 61_706, "ort_b1_ms": 0.1}])
    assert md.splitlines()[0] == "| model | accuracy | params | ORT b1 |"
    assert md.splitlines()[3] == "| pruned | 97.90% | 61.71 K (1.00x) | 0.100 ms (2.00x) |"
