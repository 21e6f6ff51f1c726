"""Same seed + same thread count on CPU = bit-identical results (docs/reliability.md)."""
from __future__ import annotations

import json

import pytest
import torch
from _helpers import tiny_mlp, toy_bundle

from modelpress import compress
from modelpress.recipes.schema import Recipe


def _recipe(seed=0, latency=False, epochs=1.0):
    return Recipe.from_dict({
        "version": 1, "name": "det", "seed": seed,
        "eval": {"latency": latency, "onnx": False, "batch_sizes": [1], "repeats": 2},
        "stages": [
            {"name": "p", "method": "prune.magnitude", "config": {"sparsity": 0.7, "keep_first_last": False},
             "finetune": {"epochs": epochs, "lr": 0.01}},
            {"name": "q", "method": "quant.weight_only", "config": {"bits": 4}}]})


def _artifacts(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*.safetensors"))}


def _without_timings(report):
    def strip(row):
        return {k: v for k, v in row.items() if not k.endswith(("_ms", "_speedup"))}
    return {**report, "rows": [strip(r) for r in report["rows"]]}


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# 2 threads: a few steps only (two threads on a busy 2-core machine wait on each other a lot)
@pytest.mark.parametrize("n_threads, epochs", [(1, 1.0), (2, 0.25)])
def test_two_runs_with_the_same_seed_and_threads_write_identical_bytes(tmp_path, threads, n_threads, epochs):
    threads(n_threads)
    a = compress(tiny_mlp(), _recipe(epochs=epochs), toy_bundle(), out=tmp_path / "a")
    torch.manual_seed(12345)  # the global RNG state before a run does not matter: stages seed themselves
    torch.rand(100)
    b = compress(tiny_mlp(), _recipe(epochs=epochs), toy_bundle(), out=tmp_path / "b")
    assert _artifacts(tmp_path / "a") == _artifacts(tmp_path / "b")
    assert len(_artifacts(tmp_path / "a")) == 4  # baseline, two stages, final
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()
    assert a.rows == b.rows


def test_measured_latency_does_not_leak_into_the_artifacts(tmp_path):
    """Timings differ run to run; the artifacts (whose header keeps the final row) must not."""
    compress(tiny_mlp(), _recipe(latency=True), toy_bundle(), out=tmp_path / "a")
    compress(tiny_mlp(), _recipe(latency=True), toy_bundle(), out=tmp_path / "b")
    assert _artifacts(tmp_path / "a") == _artifacts(tmp_path / "b")
    ra, rb = (json.loads((tmp_path / r / "report.json").read_text()) for r in "ab")
    assert any(k.endswith("_ms") for k in ra["rows"][0])  # latency was measured ...
    assert _without_timings(ra) == _without_timings(rb)  # ... and is all that differs
