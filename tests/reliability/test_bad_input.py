"""The bad-input matrix: every case is one ``error:`` line (what, where) + a ``hint:`` (what to
do) and exit status 2 through the CLI, and a ModelpressError subclass through the Python API."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from _helpers import NO_LATENCY, assert_one_line_error, tiny_mlp, toy_bundle

from modelpress import MagnitudePruning, compress, quantize
from modelpress.core.errors import ConfigError, DataError, MissingDependencyError, ScopeError
from modelpress.engine.registry import get_method
from modelpress.recipes.schema import Recipe

RECIPE = """version: 1
name: bad
eval: {latency: false, onnx: false}
stages:
  - name: prune
    method: prune.magnitude
    config: {sparsity: 0.5}
"""

# (recipe text edit or None, extra CLI args, model factory, fragments of the error line)
CLI_CASES = {
    "unknown stage key": (("config: {sparsity: 0.5}", "sparsity: 0.5"), [], "build",
                          ["r.yaml.stages.0.sparsity: unknown key"]),
    "unknown top-level key": (("name: bad", "name: bad\nepochs: 3"), [], "build", ["r.yaml.epochs: unknown key"]),
    "unknown config key": (("{sparsity: 0.5}", "{sparsty: 0.5}"), [], "build",
                           ["r.yaml.stages.0.config.sparsty: unknown key"]),
    "unknown method": (("prune.magnitude", "prune.magnitud"), [], "build", ["unknown method 'prune.magnitud'"]),
    "sparsity 1.2": (None, ["--set", "stage.1.sparsity=1.2"], "build",
                     ["stages.0.config.sparsity", "less than 1", "1.2"]),
    "sparsity NaN": (None, ["--set", "stage.1.sparsity=.nan"], "build", ["stages.0.config.sparsity", "finite"]),
    "bits 0": (("method: prune.magnitude\n    config: {sparsity: 0.5}",
                "method: quant.weight_only\n    config: {bits: 0}"),
               [], "build", ["stages.0.config.bits", "greater than or equal to 2"]),
    "negative T": (("config: {sparsity: 0.5}", "config: {sparsity: 0.5}\n    distill: {T: -1}"), [], "build",
                   ["stages.0.distill.T", "greater than 0"]),
    "batch size 0": (None, ["--set", "eval.batch_sizes=[0]"], "build", ["eval.batch_sizes.0"]),
    "bad override": (None, ["--set", "stage.9.sparsity=0.5"], "build", ["no stage '9'"]),
    "scope matches nothing": (None, ["--set", "stage.1.scope.include=[conv9]"], "build",
                              ["'conv9' matches no layer"]),
    "wrong input shape": (None, [], "build_wide_input",
                          ["dataset 'digits'", "cannot run on inputs of shape (1, 1, 28, 28)", "1000"]),
    "NaN weights": (None, [], "build_nan", ["parameter '3.weight' holds 1 NaN/Inf"]),
    "not YAML": (("stages:", "stages: [\n"), [], "build", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, cli, net_py, case):
    edit, extra, factory, fragments = CLI_CASES[case]
    text = RECIPE if edit is None else RECIPE.replace(*edit)
    assert edit is None or text != RECIPE
    (tmp_path / "r.yaml").write_text(text)
    res = cli("compress", "-r", tmp_path / "r.yaml", "-m", f"{net_py}:{factory}", "-d", "digits",
              "-o", tmp_path / "run", *extra)
    assert_one_line_error(res, *fragments)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_cli_empty_dataset_folder(tmp_path, cli, net_py):
    (tmp_path / "photos").mkdir()
    res = cli("evaluate", "-m", f"{net_py}:build", "-d", f"imagefolder:{tmp_path / 'photos'}")
    assert_one_line_error(res, "has no <class>/ subfolders")


# -- the Python API -------------------------------------------------------------------------
def _cfg(name, **kw):
    return get_method(name).config_cls(**kw)


@pytest.mark.parametrize("make, field", [
    (lambda: MagnitudePruning(sparsity=1.2), "sparsity"),
    (lambda: _cfg("quant.weight_only", bits=0), "bits"),
    (lambda: _cfg("distill.kd", T=-1.0), "T"),
    (lambda: MagnitudePruning(sparsity=float("nan")), "sparsity"),
    (lambda: setattr(MagnitudePruning(sparsity=0.5), "sparsity", 1.2), "sparsity"),  # assignment is validated too
    (lambda: MagnitudePruning(sparsity=0.5, spars=1), "spars"),
])
def test_api_out_of_range_and_unknown_values_are_config_errors(make, field):
    with pytest.raises(ConfigError, match=rf"\.{field}: ") as e:
        make()
    assert "\n" not in str(e.value) and e.value.hint


def test_api_scope_matching_nothing():
    with pytest.raises(ScopeError, match="'conv9' matches no layer") as e:
        from modelpress import Scope
        from modelpress.api import prune

        prune(tiny_mlp(), MagnitudePruning(sparsity=0.5, scope=Scope(include=["conv9"])))
    assert "layer names look like" in e.value.hint


CALIBRATED = ["quant.static_int8", "quant.adaround", "quant.mixed_precision"]


@pytest.mark.parametrize("method", CALIBRATED)
def test_api_empty_calibration_set(method):
    with pytest.raises(DataError, match="empty") as e:
        quantize(tiny_mlp(), _cfg(method), data=[])
    assert e.value.hint


@pytest.mark.parametrize("method", CALIBRATED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_api_nan_inf_calibration_data(method, bad):
    batch = torch.randn(8, 16)
    batch[2, 3] = bad
    with pytest.raises(DataError, match="NaN or Inf"):
        quantize(tiny_mlp(), _cfg(method), data=[torch.randn(8, 16), batch])


@pytest.mark.parametrize("method", ["prune.magnitude", "quant.weight_only", "quant.static_int8", "lowrank.svd"])
def test_api_nan_weights_name_the_parameter(method):
    model = tiny_mlp()
    with torch.no_grad():
        model[3].bias[1] = float("inf")
    with pytest.raises(DataError, match=r"parameter '3\.bias' holds 1 NaN/Inf"):
        from modelpress import apply

        apply(model, _cfg(method), data=[torch.randn(8, 16)])


def test_api_wrong_input_shape_is_one_line():
    with pytest.raises(DataError, match=r"cannot run on inputs of shape \(1, 17\)") as e:
        quantize(tiny_mlp(), _cfg("quant.static_int8"), data=[torch.randn(8, 17)])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"cannot run on inputs of shape \(1, 17\)"):
        compress(tiny_mlp(), _recipe(), _bundle_with_features(17))


def _recipe():
    return Recipe.from_dict({"version": 1, "eval": NO_LATENCY, "stages": [
        {"name": "p", "method": "prune.magnitude", "config": {"sparsity": 0.5}, "finetune": {"epochs": 1}}]})


def _bundle_with_features(n):
    from torch.utils.data import TensorDataset

    from modelpress.tasks import Classification
    from modelpress.zoo.datasets import DatasetBundle

    x, y = torch.randn(64, n), torch.randint(0, 4, (64,))
    return DatasetBundle(name="wide", train=TensorDataset(x, y), test=TensorDataset(x, y), task=Classification(),
                         num_classes=4, input_shape=(n,), meta={})


def test_compress_refuses_nan_in_the_dataset_before_training():
    with pytest.raises(DataError, match=r"dataset 'toy' train split, batch 0: the data contains NaN or Inf"):
        compress(tiny_mlp(), _recipe(), toy_bundle(nan=True))


def test_unsupported_layers_are_reported_as_left_alone(tmp_path, cli, net_py):
    (tmp_path / "r.yaml").write_text(RECIPE)
    res = cli("compress", "-r", tmp_path / "r.yaml", "-m", f"{net_py}:build_bilinear", "-d", "digits",
              "-o", tmp_path / "run")
    assert res.code == 0, res.text
    assert "left as they are: 3.bil (Bilinear)" in res.err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["unsupported_layers"] == {"3.bil": "Bilinear"}
    # the supported layers were pruned, the Bilinear was not touched
    from _helpers import NET_PY

    from modelpress.artifact.loading import load_artifact

    namespace = {}
    exec(compile(NET_PY, "net.py", "exec"), namespace)  # the same architecture, for loading
    model, _ = load_artifact(tmp_path / "run" / "model.safetensors", base_model=namespace["build_bilinear"]())
    assert float((model[3].bil.weight == 0).float().mean()) == 0.0
    assert float((model[3].fc.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_missing_optional_dependency_names_the_extra(monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    from modelpress.artifact.loading import load_model

    with pytest.raises(MissingDependencyError, match="'transformers' is not installed") as e:
        load_model("minilm")
    assert "pip install 'modelpress[nlp]'" in e.value.hint
    res = cli("evaluate", "-m", "minilm", "-d", "sts")
    assert_one_line_error(res, "'transformers' is not installed")
    assert "modelpress[nlp]" in res.err


def test_a_budget_nothing_meets_is_said_and_the_best_is_kept(tmp_path):
    from modelpress.search.space import Budget, SearchSpace
    from modelpress.search.study import run_search

    space = SearchSpace(sparsity=[0.5, 0.8], bits=None, finetune={"epochs": 0.2, "lr": 0.005},
                        sensitivity_drop=None, distill=False)
    bundle = toy_bundle()
    res = run_search(tiny_mlp(), bundle, Budget(metric="bytes", limit=1, max_drop=100), space,
                     out=tmp_path / "s", trials=2, seed=0)
    assert not res.met_budget and res.best is not None
    assert res.best["cost"] == min(t["cost"] for t in res.trials if t["state"] == "COMPLETE")
    assert (tmp_path / "s" / "best-recipe.yaml").exists()
    assert json.loads((tmp_path / "s" / "trials.json").read_text())["met_budget"] is False


def test_cli_search_over_budget_exits_3_and_says_so(tmp_path, cli, net_py, monkeypatch):
    """The CLI half (the search itself is above): status 3 and the verdict, not exit 0."""
    import modelpress.search.study as study

    trial = {"number": 0, "state": "COMPLETE", "quality": 50.0, "drop": 1.0, "cost": 900.0, "feasible": False}
    monkeypatch.setattr(study, "run_search", lambda *a, **kw: study.SearchResult(
        best=trial, met_budget=False, trials=[trial], pareto=[trial], out=tmp_path / "s"))
    res = cli("search", "-m", f"{net_py}:build", "-d", "digits", "--budget", "bytes=1", "-n", "1",
              "-o", tmp_path / "s")
    assert res.code == 3, res.text
    assert "does NOT meet the budget: no trial did; the closest is kept" in res.out
    assert "Traceback" not in res.text
