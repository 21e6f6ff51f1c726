"""Trained baselines of zoo models, cached on disk so demos and benchmarks share one checkpoint.

The cache lives in ``$MODELPRESS_CACHE`` (default ``~/.cache/modelpress``); a baseline's
file name encodes model, dataset, seed and a hash of the training config, so a changed
config never reuses a stale file.

    >>> from modelpress.zoo.baselines import baseline_path
    >>> baseline_path("lenet5", "mnist5k").name  # doctest: +ELLIPSIS
    'lenet5-mnist5k-seed0-...safetensors'
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..artifact.checkpoint import save_artifact
from ..artifact.loading import ModelSource, load_artifact, register_source
from ..core.data import Data
from ..core.errors import ModelLoadError
from ..core.progress import log
from ..core.training import TrainConfig, fit
from .models import MODELS, accepted_kwargs, build_model, list_models

DEFAULT_TRAIN = TrainConfig(epochs=10, lr=3e-3, batch_size=32)


def cache_dir() -> Path:
    return Path(os.environ.get("MODELPRESS_CACHE", Path.home() / ".cache" / "modelpress"))


def baseline_path(model: str, dataset: str, seed: int = 0, train: TrainConfig | None = None) -> Path:
    train = train or DEFAULT_TRAIN
    key = hashlib.sha1(json.dumps(train.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    name = dataset.replace(":", "_").replace("/", "_")
    return cache_dir() / "baselines" / f"{model}-{name}-seed{seed}-{key}.safetensors"


def train_model(model: nn.Module, bundle, train: TrainConfig, seed: int = 0) -> nn.Module:
    """Train a classifier from scratch on ``bundle.train`` (seeded) and return it."""
    if not bundle.task.labelled:
        raise ModelLoadError(f"training from scratch needs labels; {bundle.name} is a {bundle.task.name} dataset",
                             hint="sentence encoders come pretrained (e.g. the minilm zoo model)")
    torch.manual_seed(seed)
    fit(model, Data(bundle.train, batch_size=train.batch_size, shuffle=True, seed=seed), train,
        description=f"train {getattr(model, 'zoo_spec', {}).get('zoo', type(model).__name__)}")
    return model.eval()


def shape_kwargs(model_name: str, bundle) -> dict:
    """Zoo-model keyword arguments that fit the dataset: classes, channels, image size."""
    wanted = {"num_classes": bundle.num_classes, "in_channels": bundle.input_shape[0] if bundle.input_shape else None,
              "image_size": bundle.input_shape[-1] if len(bundle.input_shape or ()) == 3 else None}
    ok = accepted_kwargs(model_name)
    return {k: v for k, v in wanted.items() if k in ok and v is not None}


def get_baseline(model_name: str, bundle, *, seed: int = 0, train: TrainConfig | None = None,
                 retrain: bool = False) -> tuple[nn.Module, Path]:
    """The trained zoo model ``model_name`` on ``bundle``, from the cache or trained now."""
    train = train or DEFAULT_TRAIN
    path = baseline_path(model_name, bundle.name, seed, train)
    if path.exists() and not retrain:
        try:
            model, _ = load_artifact(path)
            log(f"[dim]baseline loaded from {path}[/dim]")
            return model, path
        except ModelLoadError as exc:  # a corrupt cache file is rebuilt, not fatal
            log(f"[yellow]cached baseline unusable ({exc}); retraining[/yellow]")
    torch.manual_seed(seed)
    model = build_model(model_name, **shape_kwargs(model_name, bundle))
    if bundle.task.labelled:
        train_model(model, bundle, train, seed)
        quality = ", ".join(f"{k} {v:.4f}" for k, v in bundle.evaluate(model).items())
        log(f"baseline {model_name} on {bundle.name}: test {quality}")
    save_artifact(model, path, meta={"dataset": bundle.name, "seed": seed, "train": train.to_dict()})
    return model.eval(), path


# -- the zoo as a model source: names on the command line, {"zoo": name} in artifacts --------------
def _trained(record: dict, bundle, *, seed: int = 0, train=None) -> nn.Module | None:
    """A zoo model on labelled data means its trained baseline (cached); else None."""
    if bundle is None or not bundle.task.labelled:
        return None
    return get_baseline(record["zoo"], bundle, seed=seed, train=train)[0]


register_source("zoo", ModelSource(
    build=lambda record: build_model(record["zoo"], **record.get("kwargs", {})),
    resolve=lambda ref: {"zoo": ref, "kwargs": {}} if ref in MODELS else None,
    trained=_trained, names=list_models))
