"""What a compression search may choose, under which budget, and how one choice becomes a recipe.

A trial picks, from a :class:`SearchSpace`:

* ``channels``: a structured MAC-reduction target for ``prune.channels`` (0 = skip the stage);
* ``rank``: a parameter ratio for low-rank factorization of Linear layers (``lowrank.svd``; 1 = skip);
* ``sparsity``: an unstructured sparsity *per layer* for ``prune.magnitude`` (AGP schedule), or
  with ``ranking: global`` one sparsity for the whole model, the smallest weights of all layers
  going first (Deep Compression's setting: one knob instead of one per layer);
* ``bits``: k-means weight-sharing bits *per layer* (``quant.kmeans``, stored with Huffman coding),
  or with ``bits_per: type`` per layer type (one choice for the Conv2d layers, one for the Linear
  ones, as Deep Compression's 8/5 bits);

in this order, each stage fine-tuned (optionally distilling from the uncompressed baseline).
The choices become a plain :class:`~modelpress.recipes.schema.Recipe`, so the best trial is a
recipe file that ``modelpress compress`` reruns to the same result.

Sensitivity (per-layer accuracy when only that layer is pruned, see
:func:`~modelpress.pruning.sensitivity.sensitivity_scan`) shrinks the space: a layer never
gets a sparsity at which pruning it *alone* already costs more than ``sensitivity_drop`` points
(per-layer ranking only).

The global / per-type space is small enough for a short study. LeNet-5 on mnist5k, 50x smaller
than fp32 within 0.5 points (20 trials, 7m44s on 1 thread; best: 97.40%, 4,701 B, 52.6x, the
built-in recipe ``lenet5-deep-compression``)::

    modelpress search -m lenet5 --budget bytes=4945 --max-drop 0.5 -n 20 -o runs/s --set ranking=global
        --set 'sparsity=[0.93,0.94,0.95,0.96]' --set bits_per=type --set 'bits=[2,3,4]'
        --set finetune.epochs=6 --set finetune.lr=0.002    # (one command line)
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ..core.config import StrictModel
from ..core.errors import ConfigError
from ..core.training import TrainConfig

COST_KEYS = {"bytes": "artifact_bytes", "macs": "macs"}


class Budget(StrictModel):
    """The constraint a search must meet: one cost at most ``limit``, quality drop at most ``max_drop``.

    ``metric``: ``bytes`` (the artifact on disk), ``macs`` (per sample) or ``latency`` (median ms
    at ``batch_size`` on ``runtime``: eager PyTorch or a runtime of :mod:`modelpress.runtime`, timed on
    the file the model deploys as, ``threads`` threads; LiteRT at batch 1).
    ``max_drop`` is in points of the quality metric (accuracy in %, Spearman x 100, perplexity itself).
    """

    metric: Literal["bytes", "macs", "latency"] = "bytes"
    limit: float = Field(..., gt=0, description="the most bytes / MACs / milliseconds allowed")
    max_drop: float = Field(1.0, ge=0, description="largest quality drop allowed, in points")
    runtime: str = Field("eager", description="eager (PyTorch) or a runtime: onnxruntime, openvino, litert")
    batch_size: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, name: str) -> str:
        from ..runtime import EAGER, runtime_names

        if name != EAGER and name not in runtime_names():
            raise ValueError(f"unknown runtime {name!r}; known: eager, {', '.join(runtime_names())}")
        return name

    @property
    def cost_key(self) -> str:
        if self.metric == "latency":
            from ..runtime import key_of

            return f"{key_of(self.runtime)}_b{self.batch_size}_ms"
        return COST_KEYS[self.metric]

    def eval_spec(self) -> dict:
        """What every trial measures: latency only for a latency budget, on its runtime alone."""
        latency = self.metric == "latency"
        runtimes = [self.runtime] if latency and self.runtime != "eager" else []
        return {"latency": latency, "onnx": latency and self.runtime in ("onnxruntime", "openvino"),
                "runtimes": runtimes, "batch_sizes": [self.batch_size], "threads": self.threads}

    @classmethod
    def parse(cls, text: str, max_drop: float = 1.0, **kw) -> "Budget":
        """``"bytes=5000"``, ``"macs=2e6"`` or ``"latency=3.5"`` (ms)."""

        metric, sep, value = text.partition("=")
        try:
            limit = float(value)
        except ValueError:
            limit = None
        if not sep or limit is None or limit <= 0 or metric.strip() not in ("bytes", "macs", "latency"):
            raise ConfigError(f"budget {text!r} is not METRIC=VALUE with METRIC bytes, macs or latency",
                              hint="e.g. --budget bytes=5000, --budget macs=2e6, --budget latency=3.5")
        return cls(metric=metric.strip(), limit=limit, max_drop=max_drop, **kw)  # a bad setting: ConfigError


# field -> (valid choice?, what the error says)
_CHOICE_RANGES = {
    "sparsity": (lambda s: 0 <= s < 1, "sparsity choices must be in [0, 1)"),
    "bits": (lambda b: 2 <= b <= 8, "bits choices must be in 2..8"),
    "channels": (lambda c: 0 <= c < 1, "channels choices (MAC reductions) must be in [0, 1)"),
    "rank": (lambda r: 0 < r <= 1, "rank choices (parameter ratios) must be in (0, 1]"),
}


class SearchSpace(StrictModel):
    """The choices a trial may make. ``None`` (or a single value) disables a knob."""

    channels: list[float] | None = Field(None, description="prune.channels target_macs_reduction choices "
                                                           "(0 = no structured stage)")
    rank: list[float] | None = Field(None, description="lowrank.svd param_ratio choices for Linear layers "
                                                       "(1 = no factorization)")
    sparsity: list[float] | None = Field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98],
                                         description="unstructured sparsity choices (per layer, or of the "
                                                     "whole model with ranking=global)")
    ranking: Literal["layer", "global"] = Field("layer", description="layer: a sparsity per layer; global: one "
                                                                     "sparsity, smallest weights of all layers first")
    bits: list[int] | None = Field(default_factory=lambda: [8, 6, 5, 4, 3],
                                   description="k-means weight-sharing bits choices")
    bits_per: Literal["layer", "type"] = Field("layer", description="layer: bits chosen per layer; type: per layer "
                                                                    "type (Conv2d, Linear)")
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=2, lr=1e-3),
                                  description="fine-tune of every stage")
    distill: bool = Field(True, description="stages fine-tune by distilling from the uncompressed baseline")
    sensitivity_drop: float | None = Field(5.0, ge=0, description="cap a layer's sparsity where pruning it alone "
                                                                  "costs more points than this (None: no scan)")

    @field_validator("sparsity", "bits", "channels", "rank")
    @classmethod
    def _choices_in_range(cls, v, info):
        ok, message = _CHOICE_RANGES[info.field_name]
        if v is not None and not all(ok(c) for c in v):
            raise ValueError(f"{message}, got {v}")
        return v


def allowed_sparsities(space: SearchSpace, curves: dict[str, list[float]] | None, sparsities: list[float],
                       baseline: float, layers: list[str]) -> dict[str, list[float]]:
    """Per layer, the sparsity choices whose single-layer drop (from ``curves``, measured at
    ``sparsities``) stays within ``space.sensitivity_drop`` points; always at least the smallest."""
    choices = sorted(space.sparsity or [0.0])
    out = {}
    for name in layers:
        allowed = choices
        if curves and name in curves and space.sensitivity_drop is not None:
            worst_ok = 0.0
            for s, q in zip(sparsities, curves[name]):
                if (baseline - q) * 100 <= space.sensitivity_drop:
                    worst_ok = max(worst_ok, s)
                else:
                    break
            allowed = [s for s in choices if s <= worst_ok] or choices[:1]
        out[name] = allowed
    return out


def build_recipe(params: dict[str, Any], space: SearchSpace, *, name: str, model: str | None, data: str | None,
                 eval_spec: dict, seed: int = 0) -> dict:
    """The recipe (as a dict) of one trial's choices; ``params`` as suggested by the trial:
    ``channels``, ``rank``, ``sparsity`` (global ranking) or ``sparsity:<layer>``, and
    ``bits:<layer>`` or ``bits:type:<Type>`` (any key ``quant.kmeans`` takes in ``layer_bits``)."""
    ft = space.finetune.model_dump(exclude_defaults=True)
    distill = {"distill": {"T": 2.0, "alpha": 0.5}} if space.distill else {}
    stages: list[dict] = []
    if params.get("channels", 0) > 0:
        stages.append({"name": "channels", "method": "prune.channels",
                       "config": {"target_macs_reduction": params["channels"], "importance": "taylor",
                                  "round_to": 8}, "finetune": ft, **distill})
    if params.get("rank", 1.0) < 1.0:
        stages.append({"name": "svd", "method": "lowrank.svd",
                       "config": {"param_ratio": params["rank"], "keep_first_last": True}, "finetune": ft, **distill})
    layer_sparsity = {k.split(":", 1)[1]: v for k, v in params.items() if k.startswith("sparsity:") and v > 0}
    if params.get("sparsity", 0) > 0:
        stages.append({"name": "prune", "method": "prune.magnitude",
                       "config": {"ranking": "global", "keep_first_last": False, "sparsity": params["sparsity"],
                                  "schedule": {"kind": "polynomial", "end_fraction": 0.6, "frequency": 25}},
                       "finetune": ft, **distill})
    elif layer_sparsity:
        stages.append({"name": "prune", "method": "prune.magnitude",
                       "config": {"ranking": "layer", "keep_first_last": False, "sparsity": 0.0,
                                  "layer_sparsity": layer_sparsity,
                                  "scope": {"include": sorted(layer_sparsity)},
                                  "schedule": {"kind": "polynomial", "end_fraction": 0.6, "frequency": 25}},
                       "finetune": ft, **distill})
    layer_bits = {k.split(":", 1)[1]: v for k, v in params.items() if k.startswith("bits:")}
    if layer_bits:
        stages.append({"name": "share", "method": "quant.kmeans",
                       "config": {"layer_bits": layer_bits, "bits": max(layer_bits.values())},
                       "finetune": ft, **distill})
    if not stages:  # nothing chosen: an identity stage keeps the recipe valid and measured
        stages.append({"name": "none", "method": "prune.magnitude",
                       "config": {"sparsity": 0.0, "keep_first_last": False}})
    recipe = {"version": 1, "name": name, "description": "found by modelpress search", "seed": seed,
              "eval": eval_spec, "stages": stages}
    if model:
        recipe["model"] = model
    if data:
        recipe["data"] = data
    return recipe
