"""A recipe's ``export:`` section: the run ends with the runtime's file, measured in the last report row."""
from __future__ import annotations

import json

import pytest
from tinymodels import toy_bundle

from modelpress import compress
from modelpress.core.errors import ConfigError
from modelpress.recipes.schema import Recipe


def recipe(export: dict | None, latency: bool = False) -> Recipe:
    raw = {"version": 1, "name": "dyn", "eval": {"latency": latency, "onnx": False, "batch_sizes": [8]},
           "stages": [{"name": "int8", "method": "quant.dynamic_int8"}]}
    if export is not None:
        raw["export"] = export
    return Recipe.from_dict(raw)


@pytest.fixture
def trained(tiny_mlp):
    from modelpress.core.training import TrainConfig, fit
    fit(tiny_mlp, toy_bundle().train, TrainConfig(epochs=5, lr=0.01))
    return tiny_mlp


def test_export_writes_the_file_and_measures_it_last(tmp_path, trained):
    pytest.importorskip("onnxruntime")
    res = compress(trained, recipe({"runtime": "onnxruntime"}, latency=True), toy_bundle(), out=tmp_path)
    path = tmp_path / "model.onnx"
    assert res.deployed.path == path and res.deployed.runtime == "onnxruntime"
    last = res.rows[-1]
    assert [r["label"] for r in res.rows] == ["baseline", "int8", "deployed: model.onnx (ONNX Runtime)"]
    assert last["artifact_bytes"] == path.stat().st_size
    assert abs(last["accuracy"] - res.rows[1]["accuracy"]) <= 0.02  # ONNX Runtime computes what PyTorch did
    assert last["ort_b8_ms"] > 0 and last["ort_b8_speedup"] > 0  # timed against the baseline's float file
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows"][-1]["label"] == last["label"]
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob(".*"))


def test_export_for_openvino_counts_the_weights_file(tmp_path, trained):
    pytest.importorskip("openvino")
    res = compress(trained, recipe({"runtime": "openvino"}), toy_bundle(), out=tmp_path)
    xml, weights = tmp_path / "model.xml", tmp_path / "model.bin"
    assert res.deployed.path == xml and weights.exists()
    assert res.rows[-1]["artifact_bytes"] == xml.stat().st_size + weights.stat().st_size


def test_export_for_litert_calibrates_int8_on_the_training_split(tmp_path, trained):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_torch")
    spec = {"runtime": "litert", "tflite": {"precision": "int8", "weight_granularity": "tensor", "strip_names": True}}
    res = compress(trained, recipe(spec), toy_bundle(), out=tmp_path)
    path = tmp_path / "model.tflite"
    assert res.deployed.path == path and res.rows[-1]["artifact_bytes"] == path.stat().st_size
    assert res.rows[-1]["label"] == "deployed: model.tflite (LiteRT)"
    assert abs(res.rows[-1]["accuracy"] - res.rows[1]["accuracy"]) <= 0.05  # int8 activations too


def test_without_a_run_folder_the_row_stays_and_no_file_is_kept(trained):
    pytest.importorskip("onnxruntime")
    res = compress(trained, recipe({}), toy_bundle())
    assert res.deployed is None and res.rows[-1]["label"].startswith("deployed: model.onnx")


def test_export_section_is_validated():
    with pytest.raises(ConfigError, match="export.runtime"):
        recipe({"runtime": "tensorrt"})
    with pytest.raises(ConfigError, match="embedding_bits"):
        recipe({"embedding_bits": 3})
    assert recipe(None).export is None
