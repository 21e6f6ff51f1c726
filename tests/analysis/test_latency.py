"""Latency statistics, thread handling, time budgets and interleaved comparisons."""
from __future__ import annotations

import time
from itertools import groupby

import pytest
import torch
from torch import nn

from modelpress.analysis.latency import compare_latency, measure_latency, measure_onnxruntime
from modelpress.core.errors import ConfigError
from modelpress.export.onnx import export_onnx


def _sane(stats, runs, batch_size):
    assert stats.runs == runs
    assert stats.batch_size == batch_size
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.iqr_ms >= 0 and stats.std_ms >= 0 and stats.mean_ms > 0


def test_measure_latency_stats_and_threads_restored():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).train()
        stats = measure_latency(model, torch.randn(4, 32), warmup=2, repeats=10, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    _sane(stats, runs=10, batch_size=4)
    assert stats.threads == 1
    assert model.training  # measured in eval mode, flag restored
    assert stats.per_sample_ms == pytest.approx(stats.median_ms / 4)


def test_dict_inputs_and_plain_callables():
    calls = []

    def fn(input_ids, attention_mask):
        calls.append(torch.is_inference_mode_enabled())
        return input_ids * attention_mask

    inputs = {"input_ids": torch.ones(3, 5), "attention_mask": torch.ones(3, 5)}
    stats = measure_latency(fn, inputs, warmup=1, repeats=4)
    _sane(stats, runs=4, batch_size=3)
    assert calls == [True] * 5


def test_time_budget_stops_early_and_min_time_extends():
    slow = lambda x: time.sleep(0.02)  # noqa: E731
    t0 = time.perf_counter()
    stats = measure_latency(slow, torch.zeros(1), warmup=0, repeats=1000, max_time_s=0.1)
    assert 1 <= stats.runs < 20
    assert time.perf_counter() - t0 < 1.0
    assert stats.median_ms >= 15

    fast = measure_latency(lambda x: x + 1, torch.zeros(1), warmup=0, repeats=3, min_time_s=0.02)
    assert fast.runs > 3


def test_compare_latency_interleaves_and_gets_the_ratio():
    order = []

    def make(name, seconds):
        def fn(x):
            order.append(name)
            time.sleep(seconds)
        return fn

    cmp = compare_latency(make("a", 0.006), make("b", 0.001), torch.zeros(2), warmup=1, repeats=8)
    assert cmp.a.runs == cmp.b.runs == 8
    timed = order[2:]  # after one warm-up call each
    assert sorted(timed) == ["a"] * 8 + ["b"] * 8
    # A B B A A B ...: never more than two calls of one side in a row
    assert max(len(list(run)) for _, run in groupby(timed)) <= 2
    assert cmp.ratio > 2.5  # b (1 ms) is much faster than a (6 ms)
    assert cmp.ratio_p10 <= cmp.ratio_p90


def test_onnxruntime_latency(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    path = export_onnx(model, torch.randn(2, 16), tmp_path / "m.onnx")
    stats = measure_onnxruntime(path, torch.randn(8, 16), threads=1, warmup=2, repeats=6)
    _sane(stats, runs=6, batch_size=8)
    assert stats.threads == 1
    # the same path goes through measure_latency and compare_latency too
    assert measure_latency(str(path), torch.randn(8, 16), warmup=1, repeats=3, threads=1).runs == 3
    cmp = compare_latency(model, str(path), torch.randn(8, 16), warmup=1, repeats=3, threads=1)
    assert cmp.ratio > 0


def test_bad_arguments():
    with pytest.raises(ConfigError):
        measure_latency(nn.Identity(), torch.zeros(1), repeats=0)
    with pytest.raises(ConfigError):
        measure_latency(nn.Identity(), torch.zeros(1), threads=0)
