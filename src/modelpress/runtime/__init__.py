"""Runtimes that run deployed files (ONNX Runtime, OpenVINO, LiteRT) behind one interface."""
from .base import (
    EAGER,
    RUNTIMES,
    Deployed,
    Runtime,
    Session,
    as_deployed,
    available_runtimes,
    get_runtime,
    key_of,
    label_of,
    register_runtime,
    runtime_for_suffix,
    runtime_names,
)

__all__ = ["EAGER", "RUNTIMES", "Deployed", "Runtime", "Session", "as_deployed", "available_runtimes", "get_runtime",
           "key_of", "label_of", "register_runtime", "runtime_for_suffix", "runtime_names"]
