"""What the one-shot pruning methods calibrated on data share (``prune.wanda``, ``prune.sparsegpt``).

Both prune each ``Linear`` (GPT-2's ``Conv1D`` included), ``Conv2d`` and each weight matrix of an
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` from statistics of its own inputs, layer by layer in the order
the model calls them, each layer seeing its pruned predecessors' outputs
(:mod:`modelpress.engine.layerwise`), with no retraining. The target is either ``sparsity`` (the
fraction of each layer's weights set to zero) or an N:M ``pattern`` (``"2:4"``: at most 2 non-zeros
in every 4 consecutive inputs, along the inputs as ``prune.nm`` lays them out: channels-last for a
conv). Pruned weights carry masks like ``prune.magnitude``'s (a fine-tune keeps them at zero; the
artifact stores them sparse).
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field, field_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import UnsupportedError
from ..core.scope import Scope, first_and_last
from ..engine import MethodInputs, MethodResult
from ..engine.layerwise import (
    Observer,
    Offload,
    calibrate_layerwise,
    calibration_inputs,
    recurrent_rows,
    split_calibratable,
)
from ..nn.layer_kinds import RECURRENT, WeightRef, weight_refs
from .nm import reduction_length, verify_nm

LAYER_TYPES = ("Linear", "Conv2d", *RECURRENT)
# (name, layer, weight [out, in...], its observer) -> (new weight, 0/1 mask), both [out, in...]
PruneLayer = Callable[[str, nn.Module, torch.Tensor, Observer], tuple[torch.Tensor, torch.Tensor]]


class CalibratedPruning(MethodConfig):
    """Fields shared by the one-shot pruners calibrated on data (not registered itself)."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of each layer's weights set to zero")
    pattern: str | None = Field(None, description="N:M semi-structured sparsity instead, e.g. '2:4' "
                                                  "(keep 2 of every 4 consecutive inputs)")
    calibration_batches: int = Field(16, ge=1, description="batches of data run for calibration")
    offload: Offload = Field("auto", description="keep the calibrated layers' weights on disk except while "
                                                 "they run or are compressed: 'disk', 'none', or 'auto' (when "
                                                 "they and calibration do not fit in the memory available)")
    scope: Scope = Scope()
    keep_first_last: bool = Field(True, description="leave the first and last layer dense")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        if v is None:
            return v
        try:
            n, m = (int(p) for p in v.split(":"))
        except ValueError:
            raise ValueError(f"pattern must look like 'N:M', e.g. '2:4' (got {v!r})") from None
        if not 1 <= n < m <= 128:
            raise ValueError(f"pattern {v!r}: need 1 <= N < M <= 128")
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern is None else tuple(int(p) for p in self.pattern.split(":"))

    def target(self) -> str:
        return f"{self.pattern} pattern" if self.pattern else f"{self.sparsity:.0%} of the weights"


def channels_last_order(layer: nn.Module) -> torch.Tensor | None:
    """For a conv, the permutation taking its inputs from ``(in, kh, kw)`` (the weight's and the
    unfolded patches' order) to ``(kh, kw, in)`` (the order N:M groups run along); None otherwise."""
    if not isinstance(layer, nn.Conv2d):
        return None
    c, kh, kw = layer.weight.shape[1:]
    return torch.arange(c * kh * kw).reshape(c, kh, kw).permute(1, 2, 0).reshape(-1)


def run_calibrated_pruning(model: nn.Module, cfg: CalibratedPruning, inputs: MethodInputs, method: str,
                           make_observer: Callable[[int, torch.device], Observer],
                           prune_layer: PruneLayer) -> MethodResult:
    """The driver of a calibrated pruner: selects the layers (every weight matrix of a recurrent
    layer on its own, named ``rnn.weight_ih_l0`` ...), checks N:M fits, calibrates layer by layer and
    attaches masks. ``make_observer(features, device)`` builds one matrix's statistics;
    ``prune_layer(name, layer, weight [out, in...], stats)`` returns the new weight and its 0/1 mask
    (both ``[out, in...]``)."""
    default_exclude = first_and_last(model, LAYER_TYPES) if cfg.keep_first_last else []
    selected = cfg.scope.resolve(model, LAYER_TYPES, default_exclude=default_exclude)
    refs: dict[str, WeightRef] = {}      # matrix name -> its weight
    modules: dict[str, nn.Module] = {}   # layer name -> layer, for the driver
    layers, skipped = split_calibratable(selected)
    for name, layer in layers:
        for matrix, ref in weight_refs([(name, layer)]):
            k = reduction_length(ref.out_in())
            if ref.param.startswith("weight_hr"):
                skipped[matrix] = "an LSTM's projection: its inputs (the cell outputs) are not observable"
            elif cfg.nm is not None and k % cfg.nm[1]:
                skipped[matrix] = f"input dimension {k} is not divisible by m={cfg.nm[1]}"
            else:
                refs[matrix] = ref
                modules[name] = layer
    if not refs:
        why = "; ".join(f"{n} ({r})" for n, r in skipped.items()) or "the scope selects none"
        raise UnsupportedError(f"{method}: no selected layer can be pruned: {why}",
                               hint="widen the scope (Scope(include=[...]), keep_first_last=False) "
                                    "or pick another pattern")
    batches = calibration_inputs(inputs.data, cfg.calibration_batches, method)
    sparsity: dict[str, float] = {}

    def prune_matrix(matrix: str, layer: nn.Module, stats: Observer) -> None:
        ref = refs[matrix]
        with torch.no_grad():
            weight, mask = prune_layer(matrix, layer, ref.out_in().detach(), stats)
            ref.weight.copy_(ref.from_out_in(weight.to(ref.weight.dtype)))
            ref.set_mask(ref.from_out_in(mask.to(ref.weight.dtype)))
        sparsity[matrix] = float((ref.weight == 0).float().mean())

    def compress(name: str, layer: nn.Module, stats: Observer) -> None:
        if not isinstance(layer, nn.RNNBase):
            prune_matrix(name, layer, stats)
            return
        for rows in recurrent_rows(layer, stats):  # layer by layer, each on the pruned one below
            for param, x in rows.items():
                if f"{name}.{param}" in refs:
                    matrix_stats = make_observer(x.shape[1], x.device)
                    matrix_stats.observe(x)
                    prune_matrix(f"{name}.{param}", layer, matrix_stats)

    unreached = calibrate_layerwise(model, list(modules.items()), batches, make_observer, compress, method,
                                    offload=cfg.offload, log=inputs.log)
    for name in unreached:
        skipped[name] = "not reached by the calibration data"
    info: dict = {"layer_sparsity": sparsity, "target": cfg.target(), "calibration_batches": len(batches)}
    if cfg.nm is not None:
        n, m = cfg.nm
        info["pattern"] = cfg.pattern
        info["pattern_ok"] = all(verify_nm(refs[name].out_in(), n, m) for name in sparsity)
    if skipped:
        info["skipped"] = skipped
        inputs.log(f"{method}: left dense: {', '.join(f'{n} ({r})' for n, r in skipped.items())}")
    return MethodResult(model, info)
