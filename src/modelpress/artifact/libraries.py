"""Models by name from torchvision and timm: ``torchvision:resnet50``, ``timm:vit_small_patch16_224``.

A reference may carry constructor keywords and a local weights file as a query:
``torchvision:resnet18?num_classes=10&weights=/path/resnet18.pth``. Nothing is downloaded: without
``weights=`` the model is randomly initialised (with a one-line warning). The source record
``{"torchvision": name, "kwargs": {...}}`` lets an artifact of a compressed model rebuild the
architecture; the weights then come from the artifact. Needs the ``[vision]`` extra.

    >>> from modelpress.artifact.loading import load_model
    >>> model = load_model("torchvision:resnet18?num_classes=10")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import nn

from ..core.compat import prepare_torchvision
from ..core.errors import ModelLoadError, require
from ..core.progress import warn_random_init
from .loading import ModelSource, register_source


def _value(text: str) -> Any:
    """A keyword's value from a query string: int, float, bool or the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_reference(ref: str, prefix: str) -> dict | None:
    """``"torchvision:resnet18?num_classes=10"`` -> ``{"torchvision": "resnet18", "kwargs": {...}}``."""
    if not ref.startswith(prefix + ":"):
        return None
    name, _, query = ref[len(prefix) + 1:].partition("?")
    if not name:
        raise ModelLoadError(f"model reference {ref!r} names no model", hint=f"use {prefix}:NAME")
    kwargs = {k: _value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    record = {prefix: name, "kwargs": kwargs}
    weights = kwargs.pop("weights", None)
    if weights is not None:
        record["weights"] = str(Path(str(weights)).expanduser().resolve())
    return record


def _load_weights(model: nn.Module, record: dict, what: str) -> nn.Module:
    path = record.get("weights")
    if path is None:
        warn_random_init(what, "no weights= file given")
        return model
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many kinds for a bad file
        raise ModelLoadError(f"{what}: cannot load weights from {path} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
                             hint="pass a state_dict saved for this architecture (.pth or .safetensors)") from None
    return model


def _torchvision(record: dict) -> nn.Module:
    prepare_torchvision()
    models = require("torchvision.models", "vision")
    name, kwargs = record["torchvision"], dict(record.get("kwargs") or {})
    if name not in models.list_models():
        raise ModelLoadError(f"torchvision has no model {name!r}",
                             hint="see torchvision.models.list_models(); e.g. torchvision:resnet18")
    try:
        model = models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"cannot build torchvision:{name} with {kwargs}: {exc}") from None
    return _load_weights(model, record, f"torchvision:{name}")


def _timm(record: dict) -> nn.Module:
    prepare_torchvision()
    timm = require("timm", "vision")
    name, kwargs = record["timm"], dict(record.get("kwargs") or {})
    if not timm.list_models(name):
        raise ModelLoadError(f"timm has no model {name!r}", hint="see timm.list_models(); e.g. timm:resnet18")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot build timm:{name} with {kwargs}: {exc}") from None
    return _load_weights(model, record, f"timm:{name}")


def _with_record(build):
    def wrapped(record: dict) -> nn.Module:
        model = build(record)
        # the artifact records the architecture only: its own tensors replace the weights file's
        model.zoo_spec = {k: v for k, v in record.items() if k != "weights"}
        return model
    return wrapped


register_source("torchvision", ModelSource(build=_with_record(_torchvision),
                                           resolve=lambda ref: parse_reference(ref, "torchvision")))
register_source("timm", ModelSource(build=_with_record(_timm), resolve=lambda ref: parse_reference(ref, "timm")))
