"""modelpress: make trained PyTorch models smaller and faster, and measure it.

The verbs (``prune``, ``quantize``, ``distill``, ``factorize``, ``compress``, ``apply``)
each take a model, one config object and optional data, and return a new model::

    >>> import torch
    >>> from modelpress import prune, MagnitudePruning
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    >>> sparse = prune(net, MagnitudePruning(sparsity=0.5))

Names are imported lazily, so ``modelpress --help`` does not pay for importing torch.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("modelpress")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

_EXPORTS = {
    "apply": ".api", "compress": ".api", "distill": ".api", "factorize": ".api",
    "prune": ".api", "quantize": ".api",
    "MethodConfig": ".core.config", "Data": ".core.data", "ModelpressError": ".core.errors",
    "Scope": ".core.scope", "TrainConfig": ".core.training", "Evaluation": ".core.training",
    "get_method": ".engine", "list_methods": ".engine", "run_method": ".engine", "MethodInputs": ".engine",
    "MethodReport": ".engine",
    "Task": ".tasks", "Classification": ".tasks", "SentenceEmbedding": ".tasks", "DatasetBundle": ".tasks",
    "load_dataset": ".tasks",
    "MagnitudePruning": ".pruning.magnitude", "RandomPruning": ".pruning.criteria",
    "TaylorPruning": ".pruning.criteria", "SNIPPruning": ".pruning.criteria", "NMSparsity": ".pruning.nm",
    "Wanda": ".pruning.wanda", "SparseGPT": ".pruning.sparsegpt",
    "SoftFilterPruning": ".pruning.soft_filter", "IterativePruning": ".pruning.iterative",
    "SensitivityConfig": ".pruning.sensitivity", "sensitivity_scan": ".pruning.sensitivity",
    "ChannelPruning": ".pruning.structured", "iter_groups": ".pruning.structured", "HeadPruning": ".pruning.heads",
    "OneShot": ".pruning.schedules", "Constant": ".pruning.schedules", "Polynomial": ".pruning.schedules",
    "QuantSpec": ".quantization.primitives", "WeightOnly": ".quantization.weight_only", "QAT": ".quantization.qat",
    "AdaRound": ".quantization.adaround", "GPTQ": ".quantization.gptq", "AWQ": ".quantization.awq",
    "SmoothQuant": ".quantization.smoothquant", "MixedPrecision": ".quantization.mixed",
    "StaticInt8": ".quantization.static", "fold_batchnorm": ".quantization.fold",
    "make_observer": ".quantization.observers", "export_int8_onnx": ".export.onnx_quant",
    "DynamicInt8": ".quantization.dynamic", "DynamicInt8Linear": ".quantization.dynamic",
    "WeightSharing": ".quantization.codebook", "PowerOfTwo": ".quantization.codebook",
    "CodebookLinear": ".quantization.codebook", "CodebookConv2d": ".quantization.codebook",
    "QuantLinear": ".quantization.modules", "QuantConv2d": ".quantization.modules",
    "KD": ".distillation.kd", "MutualLearning": ".distillation.mutual", "distill_from": ".distillation.kd",
    "distillation_loss": ".distillation.kd", "SelfDistillation": ".distillation.self_distill",
    "QuantAwareDistillation": ".distillation.quant_aware",
    "bert_student": ".distillation.students", "keep_layers": ".distillation.students",
    "SVD": ".lowrank.svd", "Tucker": ".lowrank.tucker", "CP": ".lowrank.cp",
    "analyze": ".analysis.analyze", "load_model": ".artifact.loading", "load_artifact": ".artifact.loading",
    "save_artifact": ".artifact.checkpoint", "export_deployable": ".export.deploy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelpress' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
