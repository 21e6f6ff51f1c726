"""Make third-party model libraries importable next to the CPU build of torch.

pip's ``torchvision`` wheel is built against the CUDA build of torch. Beside the CPU build its
compiled ops (``torchvision/_C.so``) do not load, and ``import torchvision`` then dies while
registering fake kernels for ``torchvision::nms``; ``timm`` and ``transformers`` model classes
import torchvision, so they die too (``transformers`` as a bare ``ModuleNotFoundError: Could not
import module 'BertModel'``). The model definitions are pure Python and never need those ops
(detection ops: nms, roi_align ...). :func:`prepare_torchvision` is called before modelpress
imports any of these libraries: when torchvision is installed and its ops do not load, it
registers empty stand-ins for the two modules that register kernels for them, so the import
succeeds and every classification model builds. When the ops load (a matching torch and
torchvision), nothing is changed.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_STUBS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
_prepared = False


def _ops_load(package_dir: Path) -> bool:
    import torch

    libs = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    if not libs:
        return True  # nothing compiled to load: torchvision handles that case itself
    try:
        torch.ops.load_library(str(libs[0]))
        return True
    except (OSError, RuntimeError):
        return False


def prepare_torchvision() -> None:
    """Let ``torchvision`` (and what imports it) import even when its compiled ops cannot load."""
    global _prepared
    if _prepared or "torchvision" in sys.modules:
        _prepared = True
        return
    _prepared = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    if not _ops_load(Path(next(iter(spec.submodule_search_locations)))):
        for name in _STUBS:
            sys.modules.setdefault(name, types.ModuleType(name))
