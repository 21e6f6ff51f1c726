"""The one engine: the verbs and recipe stages run a method the same way."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from tinymodels import TinyMLP, toy_bundle

from modelpress import (
    ChannelPruning,
    Data,
    MagnitudePruning,
    MethodInputs,
    Polynomial,
    TrainConfig,
    compress,
    prune,
    run_method,
)
from modelpress.core.errors import ConfigError, DataError
from modelpress.recipes.pipeline import run_recipe
from modelpress.recipes.schema import Recipe


def _one_stage(method: str, config: dict, finetune: dict, seed: int = 0) -> Recipe:
    return Recipe.from_dict({"version": 1, "name": "one", "seed": seed, "eval": {"latency": False, "onnx": False},
                             "stages": [{"method": method, "config": config, "finetune": finetune}]})


@pytest.mark.parametrize("method, config", [
    ("prune.magnitude", {"sparsity": 0.8, "schedule": {"kind": "polynomial", "frequency": 2}}),
    ("prune.channels", {"ratio": 0.25, "importance": "taylor"}),
])
def test_verb_and_one_stage_recipe_give_byte_identical_weights(method, config):
    bundle = toy_bundle()
    torch.manual_seed(5)
    model = TinyMLP()
    train = {"epochs": 2, "lr": 0.01, "batch_size": 32}
    recipe = _one_stage(method, config, train, seed=3)
    via_recipe = run_recipe(recipe, model=_copy(model), data=bundle).model
    cfg = recipe.method_configs()[0]
    via_verb = prune(model, cfg, bundle.train, train=TrainConfig(**train), seed=3)
    a, b = via_recipe.state_dict(), via_verb.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_train_config_batch_size_and_shuffle_are_honoured_by_the_verbs():
    """A Data wrapper's own batch size (64, unshuffled) no longer overrides TrainConfig."""
    bundle = toy_bundle()
    seen = []

    def loss(model, x, y):
        seen.append(x.shape[0])
        return torch.nn.functional.cross_entropy(model(x), y)

    prune(TinyMLP(), MagnitudePruning(sparsity=0.5, schedule=Polynomial(frequency=1)), Data(bundle.train),
          train=TrainConfig(epochs=1, batch_size=50), loss_fn=loss)
    assert seen and set(seen) == {50} and len(seen) == 10  # 500 samples / 50


def test_one_shot_method_with_training_is_fine_tuned_after_on_both_paths():
    bundle = toy_bundle()
    model = TinyMLP()
    out, report = run_method(model, MagnitudePruning(sparsity=0.5), MethodInputs(data=bundle.train,
                                                                                train=TrainConfig(epochs=1)))
    assert report.fine_tuned and not report.trained
    assert not torch.equal(out.fc1.weight, model.fc1.weight)
    # the masks keep the pruned weights at zero through the fine-tune
    assert float((out.fc2.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_method_inputs_are_immutable_and_the_report_is_typed():
    inputs = MethodInputs(data=[torch.randn(4, 16)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.train = TrainConfig()
    out, report = run_method(TinyMLP(), ChannelPruning(ratio=0.5), inputs)
    assert report.method == "prune.channels" and report.info["params"][1] < report.info["params"][0]
    assert report.to_dict()["method"] == "prune.channels" and not out.training


def test_a_method_needing_data_says_so():
    with pytest.raises(DataError, match="needs data"):
        run_method(TinyMLP(), ChannelPruning(ratio=0.5, importance="taylor"), MethodInputs())


def test_compress_runs_a_recipe_like_the_cli_and_names_what_is_missing(tmp_path):
    (tmp_path / "r.yaml").write_text("version: 1\nname: r\nstages:\n  - method: prune.magnitude\n")
    with pytest.raises(ConfigError, match="names no data"):
        compress(TinyMLP(), tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match="names no model"):
        compress(None, tmp_path / "r.yaml", toy_bundle())
    model = TinyMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(model, tmp_path / "r.yaml", toy_bundle(), overrides=["eval.latency=false", "eval.onnx=false"])
    assert result.rows[-1]["label"] == "magnitude" and "accuracy" in result.rows[-1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched


def test_compress_resolves_the_recipe_model_and_data_fields(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: r\nmodel: lenet5\ndata: digits\nbaseline: {train: {epochs: 2, lr: 0.003}}\n"
                      "eval: {latency: false, onnx: false}\nstages:\n  - method: prune.magnitude\n")
    result = compress(None, recipe)
    assert result.rows[0]["accuracy"] > 0.3  # the zoo model on labelled data starts from its trained baseline
