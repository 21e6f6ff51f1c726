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

from ..core.errors import ModelLoadError
from ..core.progress import log
from ..core.training import TrainConfig, evaluate_accuracy, fit

DEFAULT_TRAIN = TrainConfig(epochs=10, lr=3e-3, batch_size=32)


def cache_dir() -> Path:
    return Path(os.environ.get("MODELPRESS_CACHE", Path.home() / ".cache" / "modelpress"))


def baseline_path(model: str, dataset: str, seed: int = 0, train: TrainConfig | None = None) -> Path:
    train = train or DEFAULT_TRAIN
    key = hashlib.sha1(json.dumps(train.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / "baselines" / f"{model}-{dataset.replace(':', '_').replace('/', '_')}-seed{seed}-{key}.safetensors"


def train_model(model: nn.Module, bundle, train: TrainConfig, seed: int = 0) -> nn.Module:
    """Train a classifier from scratch on ``bundle.train`` (seeded) and return it."""
    if bundle.task != "classification":
        raise ModelLoadError(f"training from scratch is for classifiers; {bundle.name} is a {bundle.task} dataset",
                             hint="sentence encoders come pretrained (e.g. the minilm zoo model)")
    torch.manual_seed(seed)
    from ..core.data import Data
    fit(model, Data(bundle.train, batch_size=train.batch_size, shuffle=True, seed=seed), train,
        description=f"train {getattr(model, 'zoo_spec', {}).get('zoo', type(model).__name__)}")
    return model.eval()


def shape_kwargs(model_name: str, bundle) -> dict:
    """Zoo-model keyword arguments that fit the dataset: classes, channels, image size."""
    from .models import accepted_kwargs

    wanted = {"num_classes": bundle.num_classes, "in_channels": bundle.input_shape[0] if bundle.input_shape else None,
              "image_size": bundle.input_shape[-1] if len(bundle.input_shape or ()) == 3 else None}
    ok = accepted_kwargs(model_name)
    return {k: v for k, v in wanted.items() if k in ok and v is not None}


def get_baseline(model_name: str, bundle, *, seed: int = 0, train: TrainConfig | None = None,
                 retrain: bool = False) -> tuple[nn.Module, Path]:
    """The trained zoo model ``model_name`` on ``bundle``, from the cache or trained now."""
    from ..core.loading import load_artifact
    from ..export.checkpoint import save_artifact
    from .models import build_model

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
    if bundle.task == "classification":
        train_model(model, bundle, train, seed)
        acc = evaluate_accuracy(model, bundle.test)
        log(f"baseline {model_name} on {bundle.name}: test accuracy {acc:.4f}")
    save_artifact(model, path, meta={"dataset": bundle.name, "seed": seed, "train": train.to_dict()})
    return model.eval(), path
