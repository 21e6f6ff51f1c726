"""Describe and rebuild module structure, so a compressed checkpoint reloads without code changes.

Compression changes a model's structure: structured pruning shrinks layers, low-rank
replaces one layer by two, quantization swaps in packed layers. The artifact records,
for every module whose class we know how to build, ``{"class": name, "args": {...}}``.
Loading builds the original model, then replaces every module whose recorded class or
arguments differ. Only classes registered here (or with :func:`register_buildable`) can
be built: a checkpoint can never name arbitrary code to run.

Some modules cannot be built from a record (a Hugging Face attention layer needs its
model's config) but hold integer attributes that compression changes, e.g. the head count
after head pruning. Their classes are registered by name with :func:`register_attrs`; the
artifact records ``{"class": name, "attrs": {...}}`` and loading sets those attributes on
the module the original model already has (only registered names, only integers).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..core.errors import ModelLoadError
from ..core.registry import Registry
from .modules import get_module, set_module


class Buildable(NamedTuple):
    cls: type
    spec: Callable[[nn.Module], dict]  # module -> constructor arguments
    build: Callable[[dict], nn.Module]  # constructor arguments -> module


BUILDABLES: Registry[Buildable] = Registry("buildable module class", error=ModelLoadError,
                                          hint="load it with the modelpress version that wrote it")


def register_buildable(cls: type, spec: Callable[[nn.Module], dict] | None = None,
                       build: Callable[[dict], nn.Module] | None = None, name: str | None = None):
    """Allow ``cls`` in checkpoints. Custom modules may define ``spec()`` and ``from_spec(args)``."""
    spec = spec or (lambda m: m.spec())
    build = build or (lambda a: cls.from_spec(a))
    name = name or cls.__name__
    current = BUILDABLES.find(name)
    if current is None or current.cls is not cls:  # the same class registered again is a no-op
        BUILDABLES.register(name, Buildable(cls, spec, build))
    return cls


def is_rebuilt(module: nn.Module) -> bool:
    """Whether artifacts record ``module`` by its constructor arguments (its exact class is
    buildable), so a resized one is rebuilt at its new size on load."""
    entry = BUILDABLES.find(type(module).__name__)
    return entry is not None and type(module) is entry.cls


def buildable(cls):
    """Class decorator form of :func:`register_buildable` (uses ``spec``/``from_spec``)."""
    return register_buildable(cls)


# class name -> integer attributes recorded and restored (see the module docstring)
ATTRS: Registry[tuple[str, ...]] = Registry("module class with restored attributes", error=ModelLoadError)


def register_attrs(class_name: str, attrs: tuple[str, ...] | list[str]) -> None:
    """Record and restore the integer attributes ``attrs`` of modules whose class is named ``class_name``."""
    ATTRS.register(class_name, tuple(attrs))


# Integer attributes any module may have changed by a structural method and restored on load
# (head counts and widths of attention modules); see mark_int_attrs.
GENERIC_INT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "all_head_size", "split_size", "attn_dim",
                     "inner_dim", "num_key_value_heads", "num_kv_heads", "num_key_value_groups")
_MARK = "_modelpress_int_attrs"


def mark_int_attrs(module: nn.Module, names: list[str] | tuple[str, ...]) -> None:
    """Record ``names`` (of :data:`GENERIC_INT_ATTRS`) of ``module`` in artifacts, so a method's
    change of them (e.g. a head count) is restored on load, whatever the module's class."""
    names = tuple(dict.fromkeys([*getattr(module, _MARK, ()), *names]))
    bad = [n for n in names if n not in GENERIC_INT_ATTRS]
    if bad:
        raise ValueError(f"mark_int_attrs: {bad} are not restorable attributes ({', '.join(GENERIC_INT_ATTRS)})")
    if names:
        setattr(module, _MARK, names)


_HF_ATTENTION_ATTRS = ("num_attention_heads", "attention_head_size", "all_head_size")
for _name in ("BertSelfAttention", "BertSdpaSelfAttention", "RobertaSelfAttention", "RobertaSdpaSelfAttention",
              "XLMRobertaSelfAttention", "XLMRobertaSdpaSelfAttention", "CamembertSelfAttention",
              "ElectraSelfAttention"):
    register_attrs(_name, _HF_ATTENTION_ATTRS)  # changed by prune.heads


# Parameters a structural method resized on a module that is not rebuilt from a record (a
# ConvNeXt block's layer scale, a LayerNorm2d's weight): the artifact records their shapes and
# loading gives the module parameters of those shapes before the state dict fills them.
_RESIZED = "_modelpress_resized"


def mark_resized(module: nn.Module, name: str) -> None:
    """Record the shape of ``module``'s own parameter (or buffer) ``name``, or the value of its int
    attribute ``name``, in artifacts."""
    setattr(module, _RESIZED, tuple(dict.fromkeys([*getattr(module, _RESIZED, ()), name])))


def _resized_shapes(module: nn.Module) -> dict[str, list[int] | int]:
    """Shapes of the marked tensors, and values of marked int attributes (a width a forward reads)."""
    out: dict[str, list[int] | int] = {}
    for n in getattr(module, _RESIZED, ()):
        v = getattr(module, n, None)
        if isinstance(v, torch.Tensor):
            out[n] = list(v.shape)
        elif type(v) is int:
            out[n] = v
    return out


def _restore_shapes(module: nn.Module, name: str, shapes: dict) -> None:
    for attr, shape in shapes.items():
        current = getattr(module, attr, None)
        if type(shape) is int:  # a width attribute: only an existing int, only made smaller
            if type(current) is not int or not 0 < shape <= current:
                raise ModelLoadError(f"checkpoint sets {type(module).__name__}.{attr} = {shape!r} at {name!r}, "
                                     "which does not fit the model (corrupt or foreign file)")
            setattr(module, attr, shape)
            mark_resized(module, attr)
            continue
        own = attr in module._parameters or attr in module._buffers
        if not own or not isinstance(current, torch.Tensor) or not isinstance(shape, list) or \
                len(shape) != current.dim() or \
                not all(isinstance(n, int) and 0 <= n <= m for n, m in zip(shape, current.shape)):
            raise ModelLoadError(f"checkpoint resizes {type(module).__name__}.{attr} at {name!r} to {shape!r}, "
                                 "which does not fit the model (corrupt or foreign file)")
        new = current.detach().new_empty(shape)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(new, requires_grad=current.requires_grad)
        else:
            module._buffers[attr] = new
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and attr in ("weight", "bias"):
            module.normalized_shape = tuple(shape)
        mark_resized(module, attr)


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def _conv_spec(m: nn.Conv2d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride),
            "padding": m.padding if isinstance(m.padding, str) else _pair(m.padding),
            "dilation": _pair(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


def _bn_spec(m) -> dict:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
            "affine": m.affine, "track_running_stats": m.track_running_stats}


register_buildable(nn.Conv2d, _conv_spec, lambda a: nn.Conv2d(**a))
register_buildable(nn.Conv1d, _conv_spec, lambda a: nn.Conv1d(**a))
register_buildable(nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                         "bias": m.bias is not None}, lambda a: nn.Linear(**a))
register_buildable(nn.BatchNorm1d, _bn_spec, lambda a: nn.BatchNorm1d(**a))
register_buildable(nn.BatchNorm2d, _bn_spec, lambda a: nn.BatchNorm2d(**a))
register_buildable(nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                            "elementwise_affine": m.elementwise_affine,
                                            "bias": getattr(m, "bias", None) is not None},
                   lambda a: nn.LayerNorm(**a))
register_buildable(nn.Embedding, lambda m: {"num_embeddings": m.num_embeddings,
                                            "embedding_dim": m.embedding_dim,
                                            "padding_idx": m.padding_idx}, lambda a: nn.Embedding(**a))
register_buildable(nn.Identity, lambda m: {}, lambda a: nn.Identity())
# Containers: built empty, children are filled in from their own records.
register_buildable(nn.Sequential, lambda m: {}, lambda a: nn.Sequential())


def describe(model: nn.Module) -> dict[str, dict]:
    """``{module name: {"class", "args"}}`` for every module of a buildable class, and
    ``{"class", "attrs"}`` for modules of a class registered with :func:`register_attrs`."""
    out = {}
    for name, m in model.named_modules():
        cls_name = type(m).__name__
        entry = BUILDABLES.find(cls_name)
        if name and entry and type(m) is entry.cls:
            out[name] = {"class": cls_name, "args": entry.spec(m)}
            continue
        rec = {}
        if name and (cls_name in ATTRS or getattr(m, _MARK, None)):
            names = ATTRS.get(cls_name) if cls_name in ATTRS else getattr(m, _MARK)
            rec["attrs"] = {a: getattr(m, a) for a in names if isinstance(getattr(m, a, None), int)}
        if _resized_shapes(m):  # the root module too (a class token of the whole model)
            rec["shapes"] = _resized_shapes(m)
        if rec:
            out[name] = {"class": cls_name, **rec}
    return out


def _restore_attrs(model: nn.Module, name: str, rec: dict) -> None:
    cls_name = rec.get("class")
    current = get_module(model, name)
    if current is None or type(current).__name__ != cls_name:
        found = "nothing" if current is None else type(current).__name__
        raise ModelLoadError(f"checkpoint expects a {cls_name} at {name!r}, the model has {found}",
                             hint="the checkpoint was saved from a different architecture")
    _restore_shapes(current, name, rec.get("shapes") or {})
    allowed = ATTRS.get(cls_name) if cls_name in ATTRS else GENERIC_INT_ATTRS
    attrs = rec.get("attrs") or {}
    for attr, value in attrs.items():
        if attr not in allowed or not isinstance(value, int) or isinstance(value, bool):
            raise ModelLoadError(f"checkpoint sets {cls_name}.{attr} = {value!r} at {name!r}, "
                                 "which modelpress does not restore (corrupt or foreign file)")
        setattr(current, attr, value)
    if cls_name not in ATTRS and attrs:
        mark_int_attrs(current, list(attrs))  # saved again, the model records them again


def rebuild(model: nn.Module, records: dict[str, dict]) -> nn.Module:
    """Make ``model``'s structure match ``records`` (from :func:`describe`). Returns the model."""
    # Parents first, so a replaced container receives its recorded children afterwards.
    for name in sorted(records, key=lambda n: (n.count("."), n)):
        rec = records[name]
        cls_name = rec.get("class")
        if "attrs" in rec or "shapes" in rec:
            _restore_attrs(model, name, rec)
            continue
        entry = BUILDABLES.find(cls_name)
        if entry is None:
            raise ModelLoadError(f"checkpoint names module class {cls_name!r} at {name!r}, "
                                 "which modelpress does not know how to build",
                                 hint="load it with the modelpress version that wrote it")
        current = get_module(model, name)
        if current is not None and type(current) is entry.cls and entry.spec(current) == rec.get("args", {}):
            continue
        try:
            set_module(model, name, entry.build(dict(rec.get("args", {}))))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"cannot rebuild module {name!r} ({cls_name}) from the checkpoint: {exc}",
                                 hint="the checkpoint may be corrupt or from another model") from None
    return model


# -- replayed transforms ------------------------------------------------------------------
# Some methods rewrite a model in ways no per-module record can express (static int8 traces
# the model with torch.fx and inserts quantizers between ops; a layer-dropping student builder
# shortens a ModuleList). For those, the model carries a list of steps: the method, its config
# and the structure just *before* the rewrite. Loading rebuilds that structure, replays the
# method's data-free "prepare" step, and finally applies the model's own records (edits made
# after the rewrite); calibrated values then come from the state_dict. Only methods registered
# here can be replayed, with validated configs.
REPLAYS: Registry[Callable[[nn.Module, dict], nn.Module]] = Registry("replayable method", error=ModelLoadError)
_REPLAY_KEY = "modelpress_replay"


def register_replay(method: str, prepare: Callable[[nn.Module, dict], nn.Module]) -> None:
    """Let artifacts of ``method`` reload: ``prepare(model, config_dict)`` redoes the rewrite without data."""
    REPLAYS.register(method, prepare)


def get_replay(model: nn.Module) -> dict | None:
    """``{"steps": [{"method", "config", "before"}], "source"}`` if ``model`` came from replayable rewrites."""
    meta = getattr(model, "meta", None)  # torch.fx.GraphModule keeps .meta through deepcopy
    if isinstance(meta, dict) and _REPLAY_KEY in meta:
        return meta[_REPLAY_KEY]
    return getattr(model, "_" + _REPLAY_KEY, None)


def mark_replay(new: nn.Module, before: nn.Module, method: str, config: dict) -> nn.Module:
    """Record on ``new`` that it is ``before`` rewritten by ``method`` with ``config``."""
    step = {"method": method, "config": config, "before": describe(before)}
    return _record(new, get_replay(before) or {}, step, getattr(before, "zoo_spec", None))


def _record(new: nn.Module, prior: dict, step: dict, source: Any) -> nn.Module:
    rec = {"steps": [*prior.get("steps", []), step], "source": prior.get("source") or source}
    meta = getattr(new, "meta", None)
    if isinstance(meta, dict):
        meta[_REPLAY_KEY] = rec
    else:
        setattr(new, "_" + _REPLAY_KEY, rec)
    return new


def replay(model: nn.Module, steps: list[dict]) -> nn.Module:
    """Redo the recorded rewrites on ``model``: per step, rebuild the structure it started from,
    then run the method's prepare step."""
    for step in steps:
        method = step.get("method") if isinstance(step, dict) else None
        if method not in REPLAYS:
            raise ModelLoadError(f"checkpoint asks to replay {method!r}, which modelpress cannot replay",
                                 hint="load it with the modelpress version that wrote it")
        rebuild(model, step.get("before") or {})
        # the step is recorded as the file has it: a rewrite done in place (keep_layers) leaves no
        # "before" module to describe, and a later load must see the same steps to skip the replay
        prior, source = get_replay(model) or {}, getattr(model, "zoo_spec", None)
        model = REPLAYS.get(method)(model, dict(step.get("config") or {}))
        _record(model, prior, step, source)
    return model
