"""Turn what a recipe run is given (or what the recipe itself names) into a model and a dataset.

One place for the Python API (:func:`modelpress.compress`), the CLI and search: a recipe's
``model:`` and ``data:`` fields are the defaults, arguments win; a model reference that names
an untrained model of a source that trains (a zoo name on labelled data) means its trained
baseline, trained with the recipe's ``baseline.train`` and cached.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..artifact.loading import load_model, trained_model
from ..core.data import check_model_accepts
from ..core.errors import ConfigError, DataError
from ..core.training import TrainConfig
from ..tasks.base import DatasetBundle
from ..tasks.datasets import load_dataset, parse_spec
from .schema import Recipe


@dataclass
class ResolvedRun:
    model: nn.Module
    data: DatasetBundle
    model_ref: str  # what to call the model in titles ("lenet5", "my.py:build", "<module>")


def resolve_data(data: Any, seed: int = 0) -> DatasetBundle:
    """A :class:`DatasetBundle` from a bundle or a dataset spec."""
    if isinstance(data, DatasetBundle):
        return data
    if isinstance(data, str):
        return load_dataset(data, seed=seed)
    raise ConfigError(f"a recipe runs on a dataset with train and test splits; got {type(data).__name__}",
                      hint="pass a dataset spec (e.g. 'mnist5k', 'imagefolder:DIR') or a DatasetBundle")


def tokenized_for(model: nn.Module, bundle: DatasetBundle, spec: Any, seed: int = 0) -> DatasetBundle:
    """``bundle`` tokenized by ``model``'s own tokenizer: a text dataset named by a spec without
    ``?tokenizer=`` is tokenized by the bundled MiniLM's, and another encoder (``-m hf:DIR``) must
    read the token ids of its own vocabulary. Other bundles are returned as they are."""
    folder = getattr(getattr(model, "tokenizer", None), "name_or_path", None)
    have = (bundle.meta or {}).get("tokenizer")
    if not (isinstance(spec, str) and folder and have) or "tokenizer" in parse_spec(spec)[2]:
        return bundle
    if Path(folder).expanduser().resolve() == Path(have).resolve() or not Path(folder).expanduser().is_dir():
        return bundle
    return load_dataset(spec, seed=seed, tokenizer=str(folder))


def resolve_model(ref: str, bundle: DatasetBundle | None = None, *, seed: int = 0, train: TrainConfig | None = None,
                  trust_remote_code: bool = False) -> nn.Module:
    """The model ``ref`` names: trained on ``bundle`` when its source trains models, else loaded (and
    run once on ``bundle``'s inputs: a model that does not take them is one DataError line)."""
    return resolve_model_and_data(ref, bundle, seed=seed, train=train, trust_remote_code=trust_remote_code)[0]


def resolve_model_and_data(ref: str, bundle: DatasetBundle | None, *, seed: int = 0, train: TrainConfig | None = None,
                           trust_remote_code: bool = False, spec: Any = None) -> tuple[nn.Module, Any]:
    """:func:`resolve_model` and the bundle it was checked on: with ``spec`` (the dataset spec of
    ``bundle``), a text dataset tokenized by the model's own tokenizer (:func:`tokenized_for`)."""
    if bundle is not None:
        trained = trained_model(ref, bundle, seed=seed, train=train)
        if trained is not None:
            return trained, bundle
    model = load_model(ref, trust_remote_code=trust_remote_code)
    if bundle is not None:
        bundle = tokenized_for(model, bundle, spec, seed)
        name = getattr(bundle, "name", None)
        try:
            check_model_accepts(model, bundle.example_inputs(1), f"{ref} on dataset {name!r}" if name else ref)
        except DataError as exc:
            source = getattr(model, "zoo_spec", None) or {}
            if "keras" in source and not source.get("kwargs", {}).get("channels_first"):
                exc.hint = ("a Keras model takes channels-last (NHWC) images and modelpress's image datasets give "
                            "NCHW: load it as 'keras:FILE?channels_first=true'")
            raise
    return model, bundle


def resolve_run(recipe: Recipe, model: nn.Module | str | None = None, data: Any = None, *,
                trust_remote_code: bool = False) -> ResolvedRun:
    """The model (a copy when a module is given) and dataset of a run of ``recipe``."""
    data = data if data is not None else recipe.data
    if data is None:
        raise ConfigError(f"recipe {recipe.name!r} names no data and none was given",
                          hint="pass data (a dataset spec such as 'mnist5k', or -d on the command line)")
    bundle = resolve_data(data, recipe.seed)
    model = model if model is not None else recipe.model
    if model is None:
        raise ConfigError(f"recipe {recipe.name!r} names no model and none was given",
                          hint="pass a model (a module, zoo name, file.py:fn, HF folder or artifact; -m on the "
                               "command line)")
    if isinstance(model, nn.Module):
        return ResolvedRun(copy.deepcopy(model), bundle, type(model).__name__)
    if not isinstance(model, str):
        raise ConfigError(f"a recipe runs on a model or a model reference; got {type(model).__name__}",
                          hint="pass an nn.Module or a reference such as 'lenet5' or 'my.py:build'")
    m, bundle = resolve_model_and_data(model, bundle, seed=recipe.seed, train=recipe.baseline.train,
                                       trust_remote_code=trust_remote_code, spec=data)
    return ResolvedRun(m, bundle, model)
