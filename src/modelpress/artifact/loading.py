"""Turn a model reference into an ``nn.Module``, and an artifact back into the model it holds.

A reference is one of

* a modelpress artifact (``.safetensors`` written by modelpress: train, compress, export);
* ``path/to/file.py:factory``: a function in your file returning an ``nn.Module`` (the file
  is executed: only pass files you trust);
* a Keras 3 model file, ``model.keras`` or ``model.h5`` (or ``keras:PATH?channels_first=true``),
  converted to an equivalent PyTorch module (:mod:`.keras`; needs the ``[keras]`` extra);
* a local Hugging Face model directory, ``DIR`` or ``hf:DIR`` (``config.json`` + weights; with no
  weights file the model is randomly initialised; never downloaded);
* ``torchvision:NAME`` / ``timm:NAME`` with optional ``?kwarg=value&weights=FILE``
  (:mod:`.libraries`; random initialisation without a local weights file);
* a name a registered *model source* resolves, e.g. a zoo name: ``lenet5``, ``minilm`` ...
  (``modelpress list --models``).

Every loaded model carries ``model.zoo_spec``, its *source record* (``{"zoo": "lenet5",
"kwargs": {}}``, ``{"hf_dir": ...}``, ``{"factory": ...}``): how to rebuild its architecture.
The artifact writer stores it, so a compressed model reloads on its own. Sources are a
registry (:data:`SOURCES`); the zoo plugs in its names there.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..core.errors import ModelLoadError
from ..core.masks import set_mask
from ..core.progress import rebuilding_architecture
from ..core.registry import Registry
from .checkpoint import load_into, load_state
from .hf import load_hf_dir


class ModelSource(NamedTuple):
    """Where models come from. ``build(record)`` builds the architecture of a source record
    whose key is the source's name; ``resolve(reference)`` turns a command-line reference into
    such a record (None: not this source's); ``trained(record, bundle, seed, train)`` returns
    the model trained on a dataset when the source's models come untrained (the zoo's
    cached baselines); ``names()`` lists what ``resolve`` accepts, for hints."""

    build: Callable[[dict], nn.Module]
    resolve: Callable[[str], dict | None] | None = None
    trained: Callable[..., nn.Module] | None = None
    names: Callable[[], list[str]] | None = None


SOURCES: Registry[ModelSource] = Registry("model source", error=ModelLoadError,
                                          plugins=("modelpress.artifact.libraries", "modelpress.artifact.keras",
                                                   "modelpress.zoo.baselines"))


KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def register_source(name: str, source: ModelSource) -> ModelSource:
    return SOURCES.register(name, source)


def _from_factory(ref: str, kwargs: dict | None = None) -> nn.Module:
    file, _, fn_name = ref.rpartition(":")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"model file {file!r} does not exist", hint="use path/to/file.py:function_name")
    spec = importlib.util.spec_from_file_location(f"modelpress_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}",
                             hint="run the file with python to see the full error") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        available = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ModelLoadError(f"{path.name} has no function {fn_name!r}",
                             hint=f"callables in the file: {', '.join(available[:10])}")
    model = fn(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{ref} returned {type(model).__name__}, not an nn.Module")
    model.zoo_spec = {"factory": f"{path}:{fn_name}", "kwargs": kwargs or {}}
    return model


def _build_factory(record: dict, trust_remote_code: bool) -> nn.Module:
    if not trust_remote_code:
        raise ModelLoadError(f"the artifact is built by running {record['factory']}",
                             hint="pass --trust-remote-code (trust_remote_code=True) if you trust that file")
    return _from_factory(record["factory"], record.get("kwargs"))


def _build_hf_dir(record: dict) -> nn.Module:
    return load_hf_dir(Path(record["hf_dir"]))


def _hf_reference(ref: str) -> dict | None:
    return {"hf_dir": str(Path(ref[3:]).expanduser())} if ref.startswith("hf:") else None


register_source("hf_dir", ModelSource(build=_build_hf_dir, resolve=_hf_reference))


def build_source(source: dict | None, *, trust_remote_code: bool = False) -> nn.Module:
    """Build the architecture an artifact's ``source`` record names."""
    if not source or not isinstance(source, dict):
        raise ModelLoadError("the artifact does not record how to build its architecture",
                             hint="pass the original model: load_artifact(path, base_model=model)")
    if "factory" in source:  # runs code: never through the registry, always behind the flag
        return _build_factory(source, trust_remote_code)
    for key in source:
        entry = SOURCES.find(key) if isinstance(key, str) else None
        if entry is not None:
            return entry.build(source)
    raise ModelLoadError(f"unknown model source {sorted(map(str, source))} in the artifact",
                         hint=f"known sources: {', '.join(SOURCES.names())}, factory")


def resolve_reference(ref: str) -> tuple[dict, ModelSource] | None:
    """The source record and source of a name some registered source accepts, or None."""
    for _, entry in SOURCES.items():
        record = entry.resolve(ref) if entry.resolve else None
        if record is not None:
            return record, entry
    return None


def trained_model(ref: str, bundle: Any, *, seed: int = 0, train: Any = None) -> nn.Module | None:
    """The model ``ref`` names, trained on ``bundle`` when its source trains models (the zoo's
    cached baselines on labelled data); None when the source does not."""
    found = resolve_reference(ref)
    if found is None or found[1].trained is None:
        return None
    return found[1].trained(found[0], bundle, seed=seed, train=train)


def load_artifact(path: str | Path, *, base_model: nn.Module | None = None,
                  trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """Load a modelpress artifact: ``(model, header)``. The model is in eval mode."""
    state, header = load_state(path)
    if base_model is not None:
        model = copy.deepcopy(base_model)
    else:
        with rebuilding_architecture():  # the artifact's tensors replace the initial weights
            model = build_source(header.get("source"), trust_remote_code=trust_remote_code)
    check_architecture(model, header, where=str(path))
    model = load_into(model, state, header, where=str(path))
    if header.get("source"):
        model.zoo_spec = header["source"]
    for name in header.get("meta", {}).get("masked", []):  # keep pruned weights pruned in later training
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(getattr(module, pname, None), torch.Tensor):  # older artifacts listed a model's own
            set_mask(module, pname, (getattr(module, pname) != 0).float())  # *_mask buffers too
    return model.eval(), header


def check_architecture(model: nn.Module, header: dict, where: str = "") -> None:
    """Refuse a checkpoint written from another architecture than ``model``.

    Loading rebuilds the modules compression changed (shrunk, factorized, quantized), so
    layer *sizes* may differ; but a recorded layer may only be new when its parent is rebuilt
    too (a factorized layer's two factors). A layer the model does not have at all means the
    checkpoint belongs to another model, and rebuilding it would silently graft it on.
    """
    records = header.get("structure")
    if not isinstance(records, dict) or header.get("replay"):  # replayed rewrites rename modules
        return
    existing = {name for name, _ in model.named_modules()}
    for name in sorted(records):
        parent = name.rpartition(".")[0]
        if name in existing or (parent and parent in records):
            continue
        rec = records[name] if isinstance(records[name], dict) else {}
        raise ModelLoadError(f"checkpoint {where} does not fit the model ({type(model).__name__}): it has a "
                             f"{rec.get('class', 'layer')} at {name!r}, which the model lacks",
                             hint="it was saved from a different architecture; pass the model it was "
                                  "compressed from (base_model=...) or load it without one")


def load_model(ref: str | Path, *, trust_remote_code: bool = False) -> nn.Module:
    """Resolve a model reference (see module docstring) to a module."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _build_hf_dir({"hf_dir": str(path)})
        raise ModelLoadError(f"{ref} is a directory without config.json",
                             hint="pass a Hugging Face model directory, an artifact file or a zoo name")
    if path.is_file():
        if path.suffix == ".py":
            raise ModelLoadError(f"{ref} is a Python file; name the factory function",
                                 hint=f"use {ref}:function_name")
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            return _from_torch_file(path, trust_remote_code)
        if path.suffix.lower() in KERAS_SUFFIXES:  # converted by the "keras" source (artifact/keras.py)
            return build_source({"keras": str(path.resolve())})
        return load_artifact(path, trust_remote_code=trust_remote_code)[0]
    if ".py:" in ref:
        return _from_factory(ref)
    found = resolve_reference(ref)
    if found is not None:
        return found[1].build(found[0])
    names = [n for _, e in SOURCES.items() if e.names for n in e.names()]
    raise ModelLoadError(f"model {ref!r} is not a file, a directory or a zoo model",
                         hint=f"zoo models: {', '.join(names)}; or path/to/file.py:factory")


def _from_torch_file(path: Path, trust_remote_code: bool) -> nn.Module:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_remote_code)
    except pickle.UnpicklingError as exc:
        # "Unsupported global" / "unsupported GLOBAL posix.system ... is blocked": the file names
        # code to run; anything else is garbage, which fails weights_only loading too
        if "unsupported global" not in str(exc).lower():
            raise ModelLoadError(f"{path} could not be read as a PyTorch file (corrupt or not a checkpoint)",
                                 hint="re-create the file") from None
        raise ModelLoadError(f"{path} is a pickled object that needs arbitrary code to load; refused",
                             hint="pass --trust-remote-code (trust_remote_code=True) if you trust this file") from None
    except Exception as exc:
        raise ModelLoadError(f"{path} could not be read as a PyTorch file ({type(exc).__name__}: {exc})",
                             hint="the file may be truncated or corrupt") from None
    if isinstance(obj, nn.Module):
        return obj
    raise ModelLoadError(f"{path} holds a {type(obj).__name__} (weights only), not a whole model",
                         hint="load the weights into your module in Python, or save a modelpress artifact")
