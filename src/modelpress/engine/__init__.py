"""The method engine: the registry of methods and the one function that runs them.

    >>> from modelpress.engine import MethodInputs, run_method, list_methods
"""
from .inputs import MethodInputs, MethodReport, MethodResult
from .registry import MethodInfo, build_config, get_method, list_methods, register_method
from .run import run_method, stage_seed, unsupported_layers

__all__ = ["MethodInfo", "MethodInputs", "MethodReport", "MethodResult", "build_config", "get_method",
           "list_methods", "register_method", "run_method", "stage_seed", "unsupported_layers"]
