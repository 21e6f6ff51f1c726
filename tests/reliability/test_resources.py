"""Resource limits: a benchmark too large for the memory is detected and reported (not left to
the OOM killer); long runs show progress, and Ctrl-C stops them cleanly with stages saved."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _helpers import assert_one_line_error, tiny_mlp, toy_bundle, wait_status
from torch import nn

from modelpress.analysis.analyze import analyze
from modelpress.analysis.latency import (
    MEMORY_LIMIT_ENV,
    available_memory_bytes,
    check_memory,
    compare_latency,
    measure_latency,
)
from modelpress.core.errors import ConfigError, ResourceError


def test_the_estimate_is_a_lower_bound_of_the_activations():
    need = check_memory([nn.Linear(1000, 1000)], torch.randn(64, 1000))
    assert need["activations"] == 64 * 1000 * 4 and need["onnx_weights"] == 0
    need = check_memory([nn.Linear(1000, 1000)], torch.randn(64, 1000), onnx=True)
    assert need["onnx_weights"] == (1000 * 1000 + 1000) * 4  # ONNX Runtime holds its own copy


@pytest.mark.parametrize("text, expected", [("1000", 1000), ("4K", 4096), ("1.5M", 1572864), ("2G", 2 << 30),
                                            ("512MB", 512 << 20)])
def test_memory_limit_setting(monkeypatch, text, expected):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, text)
    assert available_memory_bytes() == expected  # far below the machine's: the setting wins
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ConfigError, match="is not a size"):
        available_memory_bytes()


def test_no_false_alarm_on_this_machine(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    free = available_memory_bytes()
    assert free is None or free > 0
    stats = measure_latency(tiny_mlp(), torch.randn(64, 16), warmup=1, repeats=2)
    assert stats.runs == 2


def test_a_model_too_large_for_the_benchmark_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1M")
    wide = nn.Sequential(nn.Linear(16, 8192), nn.ReLU(), nn.Linear(8192, 4))  # 64 x 8192 floats = 2 MB
    x = torch.randn(64, 16)
    for call in (lambda: measure_latency(wide, x, repeats=1),
                 lambda: compare_latency(tiny_mlp(), wide, x, repeats=1)):
        with pytest.raises(ResourceError, match=r"latency benchmark of Sequential at batch size 64 needs at least "
                                                r"2\.0 MB .* but only 1\.0 MB is available") as e:
            call()
        assert "batch sizes" in e.value.hint and "\n" not in str(e.value)
    measure_latency(wide, x[:8], warmup=0, repeats=1)  # a smaller batch fits: 8 x 8192 floats


def test_analyze_reports_what_did_not_fit_and_measures_the_rest(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "600K")
    wide = nn.Sequential(nn.Linear(16, 8192), nn.ReLU(), nn.Linear(8192, 4))
    report = analyze(wide, torch.randn(1, 16), batch_sizes=(1, 64), onnx=True, repeats=2, warmup=0)
    assert "needs at least" in report.errors["memory"]  # batch 64 does not fit ...
    assert "needs at least" in report.errors["latency_eager_bs64"]
    assert "the ONNX export" in report.errors["onnx"]  # ... nor a copy of the 0.66 MB of weights
    assert report.latency_ms("eager", 1) is not None  # ... batch 1 does, and was measured
    assert report.params_total == 16 * 8192 + 8192 + 8192 * 4 + 4


def test_compress_checks_memory_before_any_stage(tmp_path, cli, net_py, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "100K")
    (tmp_path / "r.yaml").write_text("version: 1\neval: {latency: true, onnx: false, batch_sizes: [1, 64]}\n"
                                     "stages: [{method: prune.magnitude, config: {sparsity: 0.5}}]\n")
    res = cli("compress", "-r", tmp_path / "r.yaml", "-m", f"{net_py}:build", "-d", "digits", "-o", tmp_path / "run")
    assert_one_line_error(res, "the latency benchmark (eval.batch_sizes)", "at batch size 64",
                          "but only 0.1 MB is available")
    assert "eval.latency=false" in res.err
    assert not (tmp_path / "run" / "baseline.json").exists()


def test_training_shows_progress_in_a_terminal(monkeypatch):
    from rich.console import Console

    import modelpress.core.progress as progress
    from modelpress.core.training import TrainConfig, fit

    buf = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=buf, force_terminal=True, width=120))
    monkeypatch.setenv("MODELPRESS_PROGRESS", "1")
    fit(tiny_mlp(), toy_bundle().train, TrainConfig(epochs=1, lr=0.01), description="fine-tune p60")
    shown = buf.getvalue()
    assert "fine-tune p60" in shown and "8/8" in shown and "loss" in shown  # 500 samples / 64


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(tmp_path, cli, net_py):
    """SIGINT (Ctrl-C) during stage 2: exit 130 with one message, stage 1 saved and whole,
    nothing half-written; the same command then resumes after stage 1."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: ctrl-c\neval: {latency: false, onnx: false}\nstages:\n"
                      "  - {name: p50, method: prune.magnitude, config: {sparsity: 0.5, keep_first_last: false}}\n"
                      "  - {name: p80, method: prune.magnitude, config: {sparsity: 0.8, keep_first_last: false},\n"
                      "     finetune: {epochs: 1, lr: 0.001}}\n")
    run, log = tmp_path / "run", tmp_path / "log.txt"
    args = ["compress", "-r", recipe, "-m", f"{net_py}:build", "-d", "digits", "-o", run]
    # a new interpreter, not a fork of this one: once the LiteRT tests have loaded JAX (threads) in this
    # worker, a forked child can die of SIGSEGV when the signal arrives
    launcher = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "from modelpress.cli import main; main()")
    with open(log, "w") as sink:
        pid = subprocess.Popen([sys.executable, "-c", launcher, *map(str, args)], stdout=sink,
                               stderr=subprocess.STDOUT, env={**os.environ, "MODELPRESS_PROGRESS": "0"}).pid
    marker = run / "stages" / "01-p50" / "metrics.json"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and not os.waitpid(pid, os.WNOHANG)[0]:
        time.sleep(0.005)
    assert marker.exists(), log.read_text()
    os.kill(pid, signal.SIGINT)  # stage 2 (or the reports after stage 1) is running
    status = wait_status(pid, timeout=30)
    text = log.read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, (status, text)
    assert "Traceback" not in text
    assert "interrupted (Ctrl-C); finished stages are saved, rerun the same command to resume" in text
    assert f"finished stages are saved in {run}" in text
    # what was finished is saved and whole; nothing half-written, no final artifact
    assert json.loads(marker.read_text())["row"]["label"] == "p50"
    assert not (run / "model.safetensors").exists() and not list(run.rglob(".*.tmp"))
    res = cli(*args)
    assert res.code == 0, res.text
    assert "p50: already done, loaded" in res.err and "stage 2/2" in res.err
    report = json.loads((run / "report.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["baseline", "p50", "p80"]


