"""SmoothQuant (``quant.smoothquant``), Xiao et al. 2022: activation outliers moved into the weights,
then static W8A8.

Transformer activations have a few channels with values 10-100x the rest, so one int8 scale per
activation tensor (what int8 kernels take) wastes most of its range on them. SmoothQuant divides
input channel ``j`` of each Linear by ``s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)``
and multiplies the weight's column ``j`` by it: the product is unchanged, the activation is flat
enough for per-tensor int8, and the weights (per-channel int8) take the outliers. How much to
move depends on the layer: ``alpha="auto"`` (the default) scores no smoothing and alphas 0.2-0.9
for each input on kept calibration rows (the layers' output error with the input quantized by
this config's observer and the weights per channel) and keeps the best, so a layer whose
activations are already flat is left alone; a number applies that alpha everywhere (the paper's
0.5).

The division goes into the op that produces the input when one can absorb it exactly (a norm's
affine weight, a Linear's output rows; found and proven on the model, :mod:`.smoothing`);
otherwise (``explicit=True``, e.g. BERT's post-norm blocks, whose norm also feeds the residual)
the layer gets an :class:`~.smoothing.InputScale` in front of it: one element-wise ``Mul`` per
input in the deployed graph. Then ``quant.static_int8`` runs on the smoothed model with this
config's observer settings, so the result exports as an ONNX Runtime QDQ int8 model like any
static int8 model (``info["smoothing"]`` says, per input, where the scales went).

    >>> import torch
    >>> from modelpress import MethodInputs, run_method
    >>> from modelpress.quantization.smoothquant import SmoothQuant
    >>> net = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64), torch.nn.ReLU(),
    ...                           torch.nn.Linear(64, 8))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(torch.linspace(0.1, 20, 64))   # outlier channels, as in LLMs
    >>> q, report = run_method(net, SmoothQuant(alpha=0.5), MethodInputs(data=[torch.randn(32, 64)] * 4))
    >>> report.info["smoothing"]["1"]
    'folded into 0'
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..engine import MethodInputs, MethodResult, register_method
from ..engine.layerwise import calibrate_layerwise, calibration_inputs, split_calibratable
from ..nn.layer_kinds import plain_linears
from ..nn.modules import set_module
from .observers import make_observer
from .primitives import fake_quantize, fake_quantize_tensor
from .smoothing import InputScale, find_folds, scale_consumer, scale_producer, untie
from .static import StaticInt8, static_int8

LAYER_TYPES = ("Linear",)


class SmoothQuant(StaticInt8):
    """SmoothQuant: per-channel scales move activation outliers into the weights, then static int8."""

    alpha: float | Literal["auto"] = Field(
        "auto", description="migration strength in [0, 1] (0 keeps the activations, 1 moves all), or 'auto': per "
                            "input, the alpha (or no smoothing) with the least int8 output error on calibration rows")
    explicit: bool = Field(True, description="divide inputs whose producer cannot absorb the scales with an "
                                             "explicit per-channel Mul (else leave them unsmoothed)")
    sample_rows: int = Field(2048, ge=16, description="alpha='auto': input rows per layer kept to score alphas")

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v):
        if v != "auto" and not 0 <= v <= 1:
            raise ValueError("alpha must be in [0, 1] or 'auto'")
        return v


#: alphas tried by alpha='auto' (besides no smoothing at all)
AUTO_ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class AbsMax:
    """Per-channel maximum of ``|x|`` over a layer's input rows, and up to ``keep`` of the rows."""

    def __init__(self, features: int, device: torch.device | str = "cpu", keep: int = 0):
        self.amax = torch.zeros(features, device=device)
        self.rows = 0
        self.keep = keep
        self.sample: list[torch.Tensor] = []

    def observe(self, rows: torch.Tensor) -> None:
        rows = rows.detach()
        self.amax = torch.maximum(self.amax, rows.abs().amax(0).to(self.amax))
        held = sum(r.shape[0] for r in self.sample)
        if held < self.keep:  # spread over the batches: at most a quarter of the budget from one
            take = rows[:: max(1, rows.shape[0] // max(1, self.keep // 4))][: self.keep - held]
            self.sample.append(take.float().clone())
        self.rows += rows.shape[0]


def int8_output_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None, cfg: SmoothQuant,
                      ) -> float:
    """Squared error of the layers' outputs on rows ``x`` when ``x / s`` is quantized per tensor (with
    ``cfg``'s observer) and ``W * s`` per channel, against the float outputs."""
    spec = cfg.activation_spec()
    xs = x if s is None else x / s
    options = {"percentile": cfg.percentile} if cfg.observer == "percentile" else {}
    obs = make_observer(cfg.observer, spec, **options)
    obs.update(xs)
    scale, zero = obs.qparams()
    xq = fake_quantize(xs, scale.reshape(-1)[0], zero.reshape(-1)[0], spec.qmin, spec.qmax)
    err = 0.0
    for w in weights:
        w = w.detach().float()
        wq = fake_quantize_tensor(w if s is None else w * s, cfg.weight_spec())
        err += float((xq @ wq.t() - x @ w.t()).pow(2).sum())
    return err


def smoothing_scales(amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|x_j| ** alpha / max_l max|W_l[:, j]| ** (1 - alpha)`` (ones where a channel is dead)."""
    wmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = amax.float().clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    dead = (amax == 0) | (wmax == 0)
    return torch.where(dead | ~torch.isfinite(s), torch.ones_like(s), s)


def smooth(model: nn.Module, cfg: SmoothQuant, batches: list, log=print) -> dict[str, str]:
    """Smooth ``model``'s selected Linear layers in place; returns per layer where its scales went."""
    layers, skipped = split_calibratable(plain_linears(model, cfg.scope.resolve(model, LAYER_TYPES)))
    where = {name: f"not smoothed ({reason})" for name, reason in skipped.items()}
    if not layers:
        return where
    untie(model, [layer for _, layer in layers])  # a tied lm_head: scaling it must not scale the embedding
    folds = {n: f for f in find_folds(model, dict(layers), batches[0]) for n in f.consumers}
    modules = dict(model.named_modules())

    def compress_group(group: dict[str, nn.Module], observers: dict[str, AbsMax]) -> None:
        names = list(group)
        fold = folds.get(names[0])
        producer = fold.producer if fold is not None and set(fold.consumers) == set(names) else None
        if producer is None and not cfg.explicit:
            where.update({n: "not smoothed (no op can absorb the scales; explicit=False)" for n in names})
            return
        stats, weights = observers[names[0]], [m.weight for m in group.values()]
        if cfg.alpha == "auto":
            x = torch.cat(stats.sample)
            errors = {None: int8_output_error(x, weights, None, cfg)}
            for a in AUTO_ALPHAS:
                errors[a] = int8_output_error(x, weights, smoothing_scales(stats.amax, weights, a), cfg)
            alpha = min(errors, key=errors.get)
            if alpha is None:
                where.update({n: "not smoothed (no alpha lowered the int8 error)" for n in names})
                return
        else:
            alpha = cfg.alpha
        s = smoothing_scales(stats.amax, weights, alpha)
        for layer in group.values():
            scale_consumer(layer, s)
        if producer is not None:
            scale_producer(modules[producer], s)
            where.update({n: f"folded into {producer}" for n in names})
        else:
            for n, layer in group.items():  # at once: later groups are observed on the smoothed model
                scaled = InputScale(layer).to(layer.weight.device)  # (the driver's hooks stay on `layer`)
                scaled.inv_scale.copy_((1.0 / s).to(scaled.inv_scale))
                set_module(model, n, scaled)
            where.update({n: "explicit Mul" for n in names})
        if cfg.alpha == "auto":
            where.update({n: f"{where[n]} (alpha {alpha})" for n in names})

    keep = cfg.sample_rows if cfg.alpha == "auto" else 0
    unreached = calibrate_layerwise(model, layers, batches, lambda f, d: AbsMax(f, d, keep), None,
                                    "quant.smoothquant", compress_group=compress_group)
    where.update({n: "not smoothed (not reached by the calibration data)" for n in unreached})
    return where


@register_method("quant.smoothquant", SmoothQuant, needs_data=True, layer_types=("Linear", "Conv1d", "Conv2d"))
def smoothquant(model: nn.Module, cfg: SmoothQuant, inputs: MethodInputs) -> MethodResult:
    """SmoothQuant: activation outliers migrated into the weights (scales folded or explicit), then static W8A8."""
    batches = calibration_inputs(inputs.data, cfg.calibration_batches, "quant.smoothquant")
    where = smooth(model, cfg, batches, inputs.log)
    static = StaticInt8.from_dict({k: v for k, v in cfg.to_dict().items() if k in StaticInt8.model_fields},
                                  where="quant.smoothquant")
    result = static_int8(model, static, inputs)
    result.info["smoothing"] = where
    result.info["alpha"] = cfg.alpha
    explicit = sum(v.startswith("explicit Mul") for v in where.values())
    if explicit:
        inputs.log(f"quant.smoothquant: {explicit} of {len(where)} layers divide their input with an explicit Mul "
                   "(no op in front of them can absorb the scales)")
    return result
