"""Quantization-aware distillation (``distill.qat``): quantization-aware training whose loss is
distillation from the float model.

The float teacher is, by default, a frozen copy of the model *before* fake-quantizers are
inserted (or ``kd.teacher``: any model reference); the student is the same model trained with
:mod:`~modelpress.quantization.qat` (fake-quant weights and activations, LSQ scales, observer and
BatchNorm freezing, conversion to packed integer layers), with the loss of ``kd``: soft targets
at temperature ``T`` mixed with the labels (``alpha``), or an embedding loss for encoders. On
unlabelled batches the loss is the teacher's soft targets / embeddings alone.

The default is the teacher's plain softmax (``T=1``, ``alpha=1``: labels unused). Measured on
LeNet-5 W2A8 (``benchmarks/distill_schemes.py`` settings, 2 epochs, lr 3e-4): T=1 97.2% for
alpha 1.0 and 0.5, T=2/alpha 0.5 96.4%, T=4/alpha 0.3 95.8%, plain QAT on labels 97.1%; the
classic T=4 of offline KD over-smooths a teacher that is the student's own float self.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress import distill, TrainConfig, QAT
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> x = torch.randn(64, 8)
    >>> q = distill(net, QuantAwareDistillation(quant=QAT(weight_bits=4, observer_steps=2)), [x],
    ...             train=TrainConfig(epochs=3, lr=1e-2))
    >>> type(q[0]).__name__, q[0].qspec.bits, q[0].act_bits
    ('QuantLinear', 4, 8)

Returns a new model (the verbs copy; see :mod:`modelpress.api`).
"""
from __future__ import annotations

import copy
import dataclasses

from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import ConfigError, DataError
from ..core.training import TrainConfig
from ..engine import MethodInputs, MethodResult, register_method, run_method
from ..quantization.qat import QAT
from .kd import KD, distillation_loss, frozen, resolve_teachers


class QuantAwareDistillation(MethodConfig):
    """QAT (fake-quant student) trained on distillation from the float model (the teacher)."""

    quant: QAT = Field(default_factory=QAT, description="the quantization-aware training of the student")
    kd: KD = Field(default_factory=lambda: KD(T=1.0, alpha=1.0),
                   description="the distillation loss (default: the float model's plain softmax, T=1, labels "
                               "unused); kd.teacher None = the float model itself, frozen before quantization")


@register_method("distill.qat", QuantAwareDistillation, needs_data=True, needs_training=True,
                 layer_types=())
def quant_aware_distillation(model: nn.Module, cfg: QuantAwareDistillation, inputs: MethodInputs) -> MethodResult:
    """Quantization-aware distillation: the float model teaches its own fake-quantized copy."""
    if inputs.data is None:
        raise DataError("distill.qat needs training data (labelled or not)", hint="pass data=...")
    if cfg.kd.hints:
        raise ConfigError("distill.qat: kd.hints are not supported (response distillation only)",
                          hint="drop kd.hints")
    if cfg.kd.teacher is None and not inputs.teachers:
        teachers = [copy.deepcopy(model)]
    else:
        teachers = resolve_teachers(cfg.kd, inputs, "QuantAwareDistillation.kd.teacher")
    qat_inputs = dataclasses.replace(inputs, train=inputs.train or TrainConfig(),
                                     loss_fn=distillation_loss(teachers, cfg.kd))
    with frozen(teachers):
        out, report = run_method(model, cfg.quant, qat_inputs, inplace=True)
    return MethodResult(out, {**report.info, "teacher": "float model" if cfg.kd.teacher is None else cfg.kd.teacher,
                              "T": cfg.kd.T, "alpha": cfg.kd.alpha}, trained=True)
