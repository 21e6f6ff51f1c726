"""LiteRT export: the four precisions convert, run in the interpreter and match PyTorch; sizes shrink;
a failed check or an unconvertible model leaves no file and raises one line; latency in LiteRT."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("litert_torch", reason="needs the [tflite] extra")
pytest.importorskip("ai_edge_litert", reason="needs the [tflite] extra")

from modelpress.analysis.latency import compare_latency, measure_latency  # noqa: E402
from modelpress.core.errors import ConfigError, ModelpressError  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
from modelpress.export.deploy import export_deployable  # noqa: E402
from modelpress.export.tflite import (  # noqa: E402
    PRECISIONS,
    LiteRTRunner,
    TfliteExportError,
    TfliteMismatchError,
    TfliteOptions,
    export_tflite,
)
from modelpress.pruning.structured import ChannelPruning  # noqa: E402
from modelpress.tasks.datasets import load_dataset  # noqa: E402
from modelpress.zoo.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def lenet5():
    torch.manual_seed(0)
    return build_model("lenet5").eval()


@pytest.fixture(scope="module")
def exports(lenet5, digits, tmp_path_factory):
    """lenet5 (random weights) in each precision, int8 calibrated on digits' training split."""
    folder = tmp_path_factory.mktemp("tflite")
    return {p: export_tflite(lenet5, digits.example_inputs(8), folder / f"lenet5-{p}.tflite",
                             TfliteOptions(precision=p), calibration=digits.train) for p in PRECISIONS}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_runs_in_litert_and_matches_pytorch(exports, lenet5, digits, precision):
    done = exports[precision]
    assert done.path.stat().st_size == done.bytes and done.input_shapes == {"args_0": (1, 1, 28, 28)}
    assert done.check.samples == 8 and f"{done.bytes:,} bytes" in done.note and precision in done.note
    # on inputs the check did not see
    x = digits.example_inputs(24)[16:]
    runner = LiteRTRunner(done.path)
    got = np.concatenate([runner(x[i:i + 1]) for i in range(len(x))])
    with torch.no_grad():
        ref = lenet5(x).numpy()
    if precision == "fp32":
        assert np.abs(got - ref).max() < 1e-4 * max(1, np.abs(ref).max())
    elif precision == "fp16":
        assert np.abs(got - ref).max() < 1e-2 * max(1, np.abs(ref).max())
    else:
        sqnr = 10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum())
        assert sqnr > 20 and done.check.sqnr_db > 20, (sqnr, done.note)
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75
    if precision == "int8":  # full integer: int8 in and out, scales in the file
        assert runner.inputs["args_0"]["dtype"] == np.int8 and "calibrated on 256 samples" in done.note


def test_bytes_shrink_with_precision(exports):
    fp32 = exports["fp32"].bytes
    n_weights = sum(p.numel() for p in build_model("lenet5").parameters())
    assert 4 * n_weights <= fp32 < 4 * n_weights + 20_000
    assert 0.45 < exports["fp16"].bytes / fp32 < 0.6
    for p in ("dynamic_int8", "int8"):
        assert 0.2 < exports[p].bytes / fp32 < 0.35, p
    assert all(e.gzip_bytes < e.bytes for e in exports.values())


def test_structurally_pruned_model_exports_smaller(exports, lenet5, digits, tmp_path):
    pruned, _ = run_method(lenet5, ChannelPruning(ratio=0.5, input_shape=(1, 1, 28, 28)), MethodInputs())
    done = export_deployable(pruned.eval(), digits.example_inputs(4), tmp_path / "p.tflite", fmt="tflite",
                             tflite=TfliteOptions(precision="dynamic_int8", check_samples=4))
    assert done[0].stat().st_size < 0.5 * exports["dynamic_int8"].bytes
    assert "SQNR" in done[1]


def test_stripped_names_make_the_file_smaller_and_it_runs_the_same(exports, lenet5, digits, tmp_path):
    done = export_tflite(lenet5, digits.example_inputs(8), tmp_path / "s.tflite",
                         TfliteOptions(precision="int8", strip_names=True), calibration=digits.train)
    full = exports["int8"]
    assert done.bytes < full.bytes - 1000 and done.gzip_bytes < full.gzip_bytes
    x = digits.example_inputs(8)
    a, b = LiteRTRunner(done.path), LiteRTRunner(full.path)
    assert a.input_shapes == b.input_shapes
    assert all(np.array_equal(a(x[i:i + 1]), b(x[i:i + 1])) for i in range(len(x)))


def test_failed_check_leaves_no_file_and_keeps_the_old_one(lenet5, digits, tmp_path):
    path = tmp_path / "m.tflite"
    with pytest.raises(TfliteMismatchError, match="SQNR .* dB against PyTorch") as err:
        export_tflite(lenet5, digits.example_inputs(4), path, TfliteOptions(precision="int8", min_sqnr_db=200),
                      calibration=digits.train)
    assert err.value.hint and not path.exists() and os.listdir(tmp_path) == []
    path.write_bytes(b"previous")
    with pytest.raises(TfliteMismatchError):
        export_tflite(lenet5, digits.example_inputs(4), path, TfliteOptions(precision="int8", min_sqnr_db=200),
                      calibration=digits.train)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.tflite"]


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_unconvertible_model_and_bad_options_are_one_line_errors(lenet5, tmp_path):
    with pytest.raises(TfliteExportError, match="LiteRT cannot convert DataDependent") as err:
        export_tflite(DataDependent(), torch.randn(2, 3), tmp_path / "d.tflite")
    assert "\n" not in str(err.value) and err.value.hint and not (tmp_path / "d.tflite").exists()
    with pytest.raises(ModelpressError, match="calibrates activation ranges on data"):
        export_tflite(lenet5, torch.randn(2, 1, 28, 28), tmp_path / "c.tflite", TfliteOptions(precision="int8"))
    with pytest.raises(ConfigError, match="precision"):
        TfliteOptions.from_dict({"precision": "int4"})
    with pytest.raises(ConfigError, match="is not known"):
        export_deployable(lenet5, torch.randn(1, 1, 28, 28), tmp_path / "x.bin", fmt="coreml")
    assert os.listdir(tmp_path) == []


def test_channels_last_file_takes_nhwc_and_latency_is_measured(lenet5, digits, tmp_path):
    x = digits.example_inputs(4)
    done = export_tflite(lenet5, x, tmp_path / "nhwc.tflite", TfliteOptions(channels_last=True))
    assert done.input_shapes == {"args_0": (1, 28, 28, 1)} and "NHWC" in done.note
    with torch.no_grad():
        assert done.check.max_abs_diff < 1e-4 * max(1, float(lenet5(x).abs().max()))
    stats = measure_latency(str(done.path), x[:1], warmup=1, repeats=5, threads=1)  # NCHW in: turned to NHWC
    assert stats.runs == 5 and stats.median_ms > 0 and stats.threads == 1
    cmp = compare_latency(lenet5, str(done.path), x[:1], warmup=1, repeats=5, threads=1)
    assert cmp.b.runs == 5 and cmp.ratio > 0


def test_cli_exports_int8_calibrated_on_the_dataset(tmp_path):
    out = tmp_path / "lenet5.tflite"
    env = {**os.environ, "MODELPRESS_PROGRESS": "0", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "modelpress.cli", "export", "-m", "lenet5", "-d", "digits",
                          "-o", str(out), "--set", "precision=int8", "--set", "check_samples=16"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert out.exists() and "LiteRT int8" in res.stdout and "on 16 inputs" in res.stdout
    assert "top-1 agreement" in res.stdout and "gzipped" in res.stdout


def test_weight_shared_model_exports_per_layer_int8_that_gzips_smaller(lenet5, digits, tmp_path):
    from modelpress import WeightSharing
    from modelpress.export.deploy import float_copy

    shared = float_copy(run_method(lenet5, WeightSharing(bits=3), MethodInputs())[0].eval())
    sizes = {}
    for gran in ("channel", "tensor"):
        done = export_tflite(shared, digits.example_inputs(8), tmp_path / f"{gran}.tflite",
                             TfliteOptions(precision="int8", weight_granularity=gran), calibration=digits.train)
        assert done.check.sqnr_db > 10
        sizes[gran] = done.gzip_bytes
    assert sizes["tensor"] < sizes["channel"]


def test_analyze_and_compare_models_time_litert_at_batch_1(lenet5, digits):
    """analyze / reports measure latency in the LiteRT interpreter (a float file built for it), batch 1 only."""
    from modelpress.analysis.analyze import analyze, compare_models

    x = digits.example_inputs(2)
    report = analyze(lenet5, x, batch_sizes=(1, 4), repeats=3, runtimes=("onnxruntime", "litert"))
    engines = {(e["engine"], e["batch_size"]) for e in report.latency}
    assert {("eager", 4), ("onnxruntime", 4), ("litert", 1)} <= engines and ("litert", 4) not in engines
    assert "batch 1" in report.errors["latency_litert"] and report.summary()["litert_b1_ms"] > 0
    pruned = run_method(lenet5, ChannelPruning(ratio=0.5), MethodInputs(data=digits.train))[0]
    speed = compare_models(lenet5, pruned, x, batch_sizes=(1,), repeats=3, runtimes=("litert",))
    assert speed["litert_b1_speedup"] > 0 and "eager_b1_speedup" in speed


def test_runtime_auto_builds_litert_fp32_and_int8_at_batch_1(lenet5, digits, tmp_path):
    from modelpress.analysis.choose import choose_deployable

    choice = choose_deployable(lenet5, digits, tmp_path / "m", runtimes=("litert",), max_drop=100, repeats=5,
                               warmup=1)
    assert [c.name for c in choice.candidates] == ["LiteRT fp32", "LiteRT int8"]
    assert choice.path == tmp_path / "m.tflite" and [p.name for p in tmp_path.iterdir()] == ["m.tflite"]
    assert choice.candidates[1].bytes < choice.candidates[0].bytes / 3
    with pytest.raises(ConfigError, match="batch 1 files only"):
        choose_deployable(lenet5, digits, tmp_path / "x", runtimes=("litert",), batch_size=4)
