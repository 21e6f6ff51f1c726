""""Will it be faster?": predict, before compressing, whether a recipe's result will run faster.

Compression that only zeroes weights, or stores them in fewer bits, makes a model *smaller*
but not *faster* on dense CPU kernels; what removes work (channels, heads, low-rank with
fewer MACs, int8 matrix kernels where the CPU has them) can. :func:`check_recipe` answers
per stage with ``"yes"``, ``"no"`` or ``"depends"`` and the reason, from rules backed by
this project's measurements (``benchmarks/results/``) and the CPU's instruction set.

    >>> from modelpress.recipes.schema import Recipe
    >>> r = Recipe.from_dict({"version": 1, "stages": [{"method": "prune.magnitude"}]})
    >>> check_recipe(r, "eager").verdict
    'no'
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..core.errors import ConfigError

RUNTIMES = ("eager", "onnxruntime")

UNSTRUCTURED = {"prune.magnitude", "prune.taylor", "prune.snip", "prune.random", "prune.nm", "prune.iterative",
                "prune.soft_filter", "prune.wanda", "prune.sparsegpt"}
WEIGHT_ONLY = {"quant.weight_only", "quant.gptq", "quant.awq"}
STORAGE_ONLY = {"quant.kmeans", "quant.log2", "quant.adaround", "quant.mixed_precision",
                "quant.qat",
                "distill.qat"}


@dataclass
class StageVerdict:
    stage: str
    method: str
    verdict: str  # "yes" | "no" | "depends"
    reason: str


@dataclass
class SpeedCheck:
    """Per-stage verdicts and the overall answer: ``yes`` if some stage removes work and none
    is known to slow the model down, ``no`` if nothing does, else ``depends``."""

    runtime: str
    stages: list[StageVerdict] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        kinds = {s.verdict for s in self.stages}
        if "yes" in kinds and "depends" not in kinds:
            return "yes"
        if kinds <= {"no"}:
            return "no"
        return "depends"

    def summary(self) -> str:
        head = {"yes": "likely faster", "no": "NOT faster (smaller at best)",
                "depends": "may or may not be faster: measure it"}[self.verdict]
        lines = [f"will it be faster on {self.runtime}? {head}"]
        lines += [f"  {s.stage} ({s.method}): {s.verdict} - {s.reason}" for s in self.stages]
        return "\n".join(lines)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_int8_dot_product(flags: frozenset[str] | None = None) -> bool:
    """VNNI (AVX-512 or AVX) / AMX: int8 dot products that make int8 GEMMs clearly faster than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def check_stage(method: str, config: dict, runtime: str, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """``(verdict, reason)`` for one stage."""
    if method in UNSTRUCTURED:
        if method == "prune.soft_filter":
            return "no", ("soft filter pruning zeroes whole filters but keeps them; follow it with prune.channels "
                          "to remove them")
        if method == "prune.nm" or config.get("pattern"):
            return "no", ("N:M sparsity needs sparse tensor-core kernels; dense CPU kernels run it at dense speed "
                          "(and cuSPARSELt was slower at MiniLM sizes on an H100, benchmarks/results/gpu_nm_h100.md)")
        return "no", ("zeros inside dense weight matrices: eager PyTorch and ONNX Runtime run the same dense kernels "
                      "(measured 1.00x at 90% sparsity on LeNet-5); the file shrinks with sparse storage")
    if method in ("prune.channels", "prune.heads"):
        return "yes", ("channels/heads are physically removed, so the work falls with the MACs "
                       "(measured 1.84x at -58% MACs on resnet_small, 1.30x at -35% MACs on MiniLM)")
    if method == "quant.dynamic_int8":
        return "yes" if runtime == "eager" else "depends", (
            "int8 Linear kernels with activations quantized on the fly: faster for transformer/MLP Linear layers "
            "at batch >= 8 (measured 1.54x on MiniLM at batch 32); convolutions are untouched")
    if method in ("quant.static_int8", "quant.smoothquant"):
        if runtime == "eager":
            return "no", ("the eager static int8 model simulates int8 in float (for accuracy); export it to ONNX "
                          "Runtime (modelpress export) to run int8 kernels")
        if has_int8_dot_product(flags):
            return "yes", "this CPU has int8 dot-product instructions (VNNI/AMX): int8 QDQ convolutions run faster"
        return "depends", ("no VNNI on this CPU: int8 QDQ was 1.42x faster for resnet_small but 0.41x (slower) for "
                           "LeNet-5, whose layers are too small for int8 to pay for the (de)quantize steps")
    if method in WEIGHT_ONLY:
        if runtime == "onnxruntime":
            return "depends", ("Linear layers export as ONNX Runtime's MatMulNBits: blocks of int2/int4/int8 "
                               "weights read in the matmul, fastest at batch 1 / few tokens (decode), where reading "
                               "weights dominates; convolutions and large batches run at dense speed or slower")
        return "no", ("weights are stored in fewer bits and dequantized to float for the dense kernels: smaller "
                      "on disk, same or slower at run time (export to ONNX Runtime for the MatMulNBits kernels)")
    if method in STORAGE_ONLY:
        return "no", ("weights are stored in fewer bits and dequantized to float for the dense kernels: smaller "
                      "on disk, same or slower at run time")
    if method == "lowrank.svd":
        return "depends", ("two thin matrices replace one: faster only when rank < m*n/(m+n) and the layer is big "
                           "enough to matter (measured 1.01x on LeNet-5's FC layers)")
    if method == "lowrank.tucker":
        return "depends", ("1x1 -> kxk -> 1x1 convs with fewer MACs: measured 1.04x (2.5x fewer MACs) to 1.41x "
                           "(8.9x fewer MACs) on resnet_small; more layers cost launch overhead")
    if method == "lowrank.cp":
        return "no", ("CP turns a conv into a chain of 1-D and depthwise convs, which run slowly on CPU: measured "
                      "0.68-0.78x on resnet_small despite 2.7x fewer MACs")
    if method == "distill.shallow":
        return "yes", ("whole blocks of the layer stack are removed, so the work falls with the depth "
                       "(half of MiniLM's layers: 2.00x fewer MACs, 1.98x faster in ONNX Runtime at batch 32)")
    if method.startswith("distill."):
        return "no", ("distillation trains weights; speed comes from the student's architecture (a shallower "
                      "student is faster: measured 1.98x for a 3-layer MiniLM)")
    return "depends", "no rule for this method: measure it (modelpress analyze, or the report's latency columns)"


def check_recipe(recipe, runtime: str = "eager", flags: frozenset[str] | None = None) -> SpeedCheck:
    """The verdict of every stage of ``recipe`` (a :class:`~modelpress.recipes.schema.Recipe`)."""

    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not known", hint=f"use one of {', '.join(RUNTIMES)}")
    out = SpeedCheck(runtime=runtime)
    for stage in recipe.stages:
        verdict, reason = check_stage(stage.method, stage.config, runtime, flags)
        out.stages.append(StageVerdict(stage.name, stage.method, verdict, reason))
    return out
