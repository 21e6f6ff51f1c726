"""Runtimes as plug-ins: ONNX Runtime and OpenVINO run the same file and match PyTorch; a Deployed names
file and runtime; unknown names, wrong files and missing packages are one-line errors; analyze,
compare_models, recipes and the CLI time the model in the runtimes asked for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.analysis.analyze import analyze, compare_models
from modelpress.analysis.latency import measure_latency, measure_together
from modelpress.analysis.tables import compare_rows, to_markdown
from modelpress.core.errors import ConfigError, MissingDependencyError, ModelpressError
from modelpress.export.onnx import export_onnx
from modelpress.runtime import (
    Deployed,
    Runtime,
    as_deployed,
    available_runtimes,
    get_runtime,
    register_runtime,
    runtime_names,
)
from modelpress.runtime.base import RUNTIMES

ov = pytest.importorskip("openvino", reason="needs the [openvino] extra")


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "cnn.onnx"
    export_onnx(small_cnn(), torch.randn(2, 1, 8, 8), path)
    return path


def test_builtin_runtimes_are_registered_with_their_files():
    assert {"onnxruntime", "openvino", "litert"} <= set(runtime_names())
    assert {"onnxruntime", "openvino"} <= set(available_runtimes())
    assert as_deployed("m.onnx") == Deployed(Path("m.onnx"), "onnxruntime")
    assert as_deployed("m.xml").runtime == "openvino" and as_deployed("m.tflite").runtime == "litert"
    assert as_deployed("m.pt") is None and as_deployed(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_each_runtime_runs_the_onnx_file_like_pytorch(onnx_file, runtime):
    x = torch.randn(3, 1, 8, 8)  # another batch size than the export's
    session = Deployed(onnx_file, runtime).open(threads=1)
    (out,) = session(x)
    with torch.no_grad():
        ref = small_cnn()(x)
    assert out.shape == (3, 5) and torch.allclose(out, ref, atol=1e-5)
    assert session.threads == 1


def test_openvino_ir_written_from_the_onnx_file_runs_the_same(onnx_file, tmp_path):
    xml = tmp_path / "cnn.xml"
    ov.save_model(ov.Core().read_model(str(onnx_file)), str(xml), compress_to_fp16=False)
    x = torch.randn(2, 1, 8, 8)
    (a,) = Deployed(xml, "openvino").open()(x)  # picked by the suffix too: as_deployed(xml)
    (b,) = as_deployed(onnx_file).open()(x)
    assert torch.allclose(a, b, atol=1e-5)
    stats = measure_latency(xml, x, warmup=1, repeats=3, threads=1)
    assert stats.runs == 3 and stats.threads == 1 and stats.batch_size == 2


def test_bad_names_files_and_missing_packages_are_one_line_errors(onnx_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        Deployed(onnx_file, "tensorrt")
    with pytest.raises(ConfigError, match="LiteRT does not run cnn.onnx") as err:
        get_runtime("litert").open(onnx_file)  # the file is checked first: installed or not
    assert ".tflite" in err.value.hint

    class Missing(Runtime):
        name, key, label, module, extra, suffixes = "missing-rt", "mrt", "Missing", "no_such_pkg_x", "mrt", (".mrt",)

        def _open(self, path, threads):
            raise AssertionError("never opened")

        def build(self, model, example_inputs, folder):
            raise AssertionError("never built")

    register_runtime(Missing())
    try:
        assert not get_runtime("missing-rt").available() and "missing-rt" not in available_runtimes()
        with pytest.raises(MissingDependencyError) as err:
            Deployed(tmp_path / "m.mrt", "missing-rt").open()
        assert "\n" not in str(err.value) and "modelpress[mrt]" in err.value.hint
        report = analyze(nn.Linear(4, 2), torch.randn(2, 4), batch_sizes=(1,), repeats=2, runtimes=("missing-rt",))
        assert "not installed" in report.errors["latency_missing-rt"]
        assert [e["engine"] for e in report.latency] == ["eager"]
    finally:
        RUNTIMES._entries.pop("missing-rt")
    with pytest.raises(ConfigError, match="cannot time"):
        measure_latency(str(tmp_path / "model.bin"), torch.randn(1, 4))


def test_measure_together_times_a_model_and_two_runtimes_in_turns(onnx_file):
    x = torch.randn(1, 1, 8, 8)
    stats = measure_together({"eager": small_cnn(), "ort": onnx_file, "ov": Deployed(onnx_file, "openvino")}, x,
                             warmup=1, repeats=4, threads=1)
    assert list(stats) == ["eager", "ort", "ov"]
    assert all(s.runs == 4 and s.median_ms > 0 and s.threads == 1 for s in stats.values())


def test_analyze_and_compare_models_time_every_runtime_asked_for():
    model = small_cnn()
    x = torch.randn(2, 1, 8, 8)
    report = analyze(model, x, batch_sizes=(1, 4), repeats=3, runtimes=("onnxruntime", "openvino"))
    assert {(e["engine"], e["batch_size"]) for e in report.latency} == {
        (e, b) for e in ("eager", "onnxruntime", "openvino") for b in (1, 4)}
    summary = report.summary()
    assert {"eager_b1_ms", "ort_b1_ms", "ov_b1_ms", "ov_b4_ms"} <= set(summary)
    assert "Latency OpenVINO, batch 4, 1 thr" in to_markdown({"m": report})
    table = compare_rows([{"label": "a", **summary}, {"label": "b", **summary}])
    assert "OpenVINO b1" in table and table.index("torch b1") < table.index("ORT b1") < table.index("OpenVINO b1")

    smaller = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 5))
    speed = compare_models(model, smaller, x, batch_sizes=(1,), repeats=3, runtimes=("openvino",))
    assert {"eager_b1_ms", "eager_b1_speedup", "ov_b1_ms", "ov_b1_speedup"} == set(speed)
    with pytest.raises(ConfigError, match="unknown runtime"):
        analyze(model, x, runtimes=("tvm",))


def test_recipe_eval_runtimes_are_checked_and_used(tmp_path):
    from modelpress.recipes.schema import Recipe

    with pytest.raises(ModelpressError, match="eval.runtimes"):
        Recipe.load("lenet5-prune", ["eval.runtimes=[tvm]"])
    recipe = Recipe.load("lenet5-prune", ["eval.runtimes=[onnxruntime,openvino]"])
    assert recipe.eval.runtimes == ["onnxruntime", "openvino"]


def test_cli_analyze_times_openvino_and_refuses_an_unknown_runtime(tmp_path, capsys):
    from modelpress.cli import main

    out = tmp_path / "a.json"
    for argv, code in [(["analyze", "-m", "lenet300", "-d", "digits", "--runtime", "onnxruntime,openvino",
                         "--batch-sizes", "1", "--layers", "0", "--json", str(out)], 0),
                       (["analyze", "-m", "lenet300", "-d", "digits", "--runtime", "tvm"], 2)]:
        import sys

        old, sys.argv = sys.argv, ["modelpress", *argv]
        try:
            main()
            got = 0
        except SystemExit as exc:
            got = exc.code
        finally:
            sys.argv = old
        assert got == code, capsys.readouterr().err
    assert "unknown runtime 'tvm'" in capsys.readouterr().err
    engines = {e["engine"] for e in json.loads(out.read_text())["latency"]}
    assert engines == {"eager", "onnxruntime", "openvino"}


def test_openvino_bf16_is_a_runtime_of_its_own_only_where_the_cpu_has_bf16(onnx_file):
    """OpenVINO's CPU plug-in would compute an fp32 file in bf16 on such CPUs by default; here fp32
    stays fp32 (exact) and bf16 is the separate runtime ``openvino-bf16`` (close, not exact)."""
    from modelpress.runtime.builtin import _cpu_has_bf16

    bf16 = get_runtime("openvino-bf16")
    assert bf16.available() == _cpu_has_bf16()
    x = torch.randn(3, 1, 8, 8)
    want = small_cnn()(x)
    (fp32,) = Deployed(onnx_file, "openvino").open()(x)
    assert torch.allclose(fp32, want, atol=1e-5)
    if not bf16.available():
        pytest.skip("this CPU has no native bf16 (AVX-512 BF16 / AMX)")
    (got,) = Deployed(onnx_file, "openvino-bf16").open()(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=0.05, rtol=0.05)
