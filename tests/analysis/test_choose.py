"""OpenVINO IR export, and --runtime auto: candidates built per installed runtime, checked on the test split,
timed in turns; the fastest that keeps quality is written, never a half-written file."""
from __future__ import annotations

import sys

import pytest
import torch

from modelpress.analysis.choose import choose_deployable
from modelpress.core.errors import ConfigError
from modelpress.engine import MethodInputs, run_method
from modelpress.export.deploy import export_deployable
from modelpress.quantization.static import StaticInt8
from modelpress.runtime import Deployed
from modelpress.tasks.datasets import load_dataset
from modelpress.zoo.models import build_model

pytest.importorskip("openvino", reason="needs the [openvino] extra")

from modelpress.export import deploy  # noqa: E402
from modelpress.export import openvino as ov_export  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """LeNet-5 trained 2 epochs on digits: int8 must keep its accuracy."""
    from modelpress.core.training import TrainConfig
    from modelpress.zoo.baselines import train_model

    return train_model(build_model("lenet5"), digits, TrainConfig(epochs=2, lr=2e-3))


def test_ir_of_float_and_int8_models_runs_like_pytorch(trained, digits, tmp_path):
    x = digits.example_inputs(6)
    fp32 = deploy.export_openvino(trained, x, tmp_path / "fp32.xml")
    q = run_method(trained, StaticInt8(), MethodInputs(data=digits.train))[0].eval()
    int8 = deploy.export_openvino(q, x, tmp_path / "int8.xml")
    assert "fp32" in fp32.note and "int8 QDQ" in int8.note and "OpenVINO max abs diff" in int8.note
    # int8 weights stay int8 in the .bin: under a third of the float weights
    assert (tmp_path / "int8.bin").stat().st_size < (tmp_path / "fp32.bin").stat().st_size / 3
    for path, model in ((fp32.path, trained), (int8.path, q)):
        (got,) = Deployed(path, "openvino").open()(digits.example_inputs(16))
        with torch.no_grad():
            ref = model(digits.example_inputs(16))
        assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.bin", "fp32.xml", "int8.bin", "int8.xml"]


def test_a_mismatching_ir_leaves_nothing_and_a_bad_suffix_is_refused(trained, digits, tmp_path, monkeypatch):
    monkeypatch.setattr(ov_export, "run_ir", lambda path, inputs: torch.full((6, 10), 99.0))
    with pytest.raises(ov_export.OpenVinoMismatchError, match="nothing was written"):
        deploy.export_openvino(trained, digits.example_inputs(6), tmp_path / "m.xml")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="NAME.xml"):
        export_deployable(trained, digits.example_inputs(2), tmp_path / "m.onnx", fmt="openvino")


def test_auto_keeps_the_fastest_candidate_that_keeps_accuracy(trained, digits, tmp_path):
    choice = choose_deployable(trained, digits, tmp_path / "lenet5", runtimes=("onnxruntime", "openvino"),
                               repeats=10, warmup=2)
    names = [c.name for c in choice.candidates]
    ends = "int8, first/last layer fp32"
    assert names == ["ONNX Runtime fp32", "ONNX Runtime int8", f"ONNX Runtime {ends}", "OpenVINO fp32",
                     "OpenVINO int8", f"OpenVINO {ends}"]
    assert choice.reference["accuracy"] > 0.7, choice.reference
    assert all(c.ms > 0 and c.metrics["accuracy"] > choice.reference["accuracy"] - 0.05 for c in choice.candidates)
    chosen = choice.chosen
    assert chosen.passed and chosen.drop <= 0.5
    fastest = min(c.ms for c in choice.candidates if c.passed)  # or as fast within 3% and smaller
    assert chosen.ms <= 1.03 * fastest and all(c.bytes >= chosen.bytes for c in choice.candidates
                                                   if c.passed and c.ms <= 1.03 * fastest)
    assert chosen.ms <= 1.03 * min(c.ms for c in choice.candidates if c.precision == "fp32")
    files = sorted(p.name for p in tmp_path.iterdir())  # only the chosen file: the work folder is gone
    assert files == (["lenet5.bin", "lenet5.xml"] if chosen.runtime == "openvino" else ["lenet5.onnx"])
    assert choice.path.suffix in (".onnx", ".xml") and chosen.bytes == sum(
        (tmp_path / f).stat().st_size for f in files)
    table = choice.table()
    assert table.count("\n") == 1 + 1 + 6 and f"**{chosen.name}**" in table and "PyTorch eager" in table


def test_when_nothing_keeps_quality_the_fastest_float_file_is_kept(trained, digits, tmp_path):
    choice = choose_deployable(trained, digits, tmp_path / "m", runtimes=("onnxruntime",), max_drop=-50,
                               repeats=5, warmup=1)
    assert not any(c.passed for c in choice.candidates)
    assert choice.chosen.precision == "fp32" and "nothing kept quality" in choice.chosen.note
    with pytest.raises(ConfigError, match="unknown runtime"):
        choose_deployable(trained, digits, tmp_path / "x", runtimes=("tvm",))


def test_cli_export_runtime_auto_and_openvino(trained, digits, tmp_path, capsys):
    from modelpress.artifact.checkpoint import save_artifact
    from modelpress.cli import main

    art = save_artifact(trained, tmp_path / "m.safetensors", meta={"dataset": "digits"})

    def cli(*args):
        old, sys.argv = sys.argv, ["modelpress", *map(str, args)]
        try:
            main()
            return 0
        except SystemExit as exc:
            return exc.code
        finally:
            sys.argv = old

    assert cli("export", "-m", art, "-d", "digits", "-o", tmp_path / "ov" / "m", "--runtime", "openvino") == 0
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["m.bin", "m.xml"]
    assert cli("export", "-m", art, "-d", "digits", "-o", tmp_path / "auto" / "m", "--runtime", "auto") == 0
    printed = capsys.readouterr().out
    assert "| deployable |" in printed and "wrote " in printed and len(list((tmp_path / "auto").iterdir())) >= 1
    assert cli("export", "-m", art, "-d", "digits", "-o", tmp_path / "x", "--runtime", "tensorrt") == 2
    assert "--runtime 'tensorrt' is not known" in capsys.readouterr().err
