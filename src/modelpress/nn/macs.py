"""Multiply-accumulate counts of a real forward pass.

Counting runs the model once under :class:`torch.utils.flop_counter.FlopCounterMode`, which sees
every aten op the forward executes, so matmuls written inline (``q @ k.transpose(-1, -2)``),
``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` count too, not only
Conv/Linear modules.

Conventions (the usual "MACs" of papers and of ptflops/thop for Conv/Linear):

* one MAC = one multiply + one add of a matmul or convolution; FlopCounterMode reports
  FLOPs = 2 * MACs for these, we divide by two;
* bias adds, activations, pooling, normalisation, softmax and element-wise ops are **not** MACs;
* attention counts ``Q @ K^T`` and ``P @ V`` over the full score matrix (causal masking is
  ignored, as in PyTorch's own counter);
* ``by_layer`` gives each module's *own* MACs (excluding its submodules), keyed by qualified
  name; ops of the top-level ``forward`` itself are under ``"<root>"``. The values sum to ``total``;
* ``effective_total`` is what a sparse kernel would execute: a Conv/Linear layer's MACs times the
  fraction of non-zero weights; everything else counts densely.

Example (LeNet-5's first conv: 6 maps of 28x28, each output a 1x5x5 dot product)::

    >>> import torch
    >>> from torch import nn
    >>> count_macs(nn.Conv2d(1, 6, 5, padding=2), torch.randn(1, 1, 28, 28)).total
    117600
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..core.data import call_model
from ..core.errors import UnsupportedError

ROOT = "<root>"

# Ops that do multiply-accumulate work but that FlopCounterMode has no formula for. Seeing one
# means the count is too low; we report it instead of silently returning a wrong number.
_HEAVY_OP_TOKENS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "einsum", "linear", "conv",
                    "convolution", "conv1d", "conv2d", "conv3d", "attention", "transformer",
                    "lstm", "gru", "rnn"}


@dataclass
class MacReport:
    """MACs of one forward pass (see the module docstring for the conventions)."""

    total: int
    by_layer: dict[str, int]
    effective_total: int
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # op name -> calls

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "effective_total": self.effective_total,
                "by_layer": dict(self.by_layer), "uncounted_ops": dict(self.uncounted_ops)}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # the CPU kernel behind F.scaled_dot_product_attention; torch only registers the CUDA ones
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _quantized_linear_flops(x, *args, out_val=None, **kwargs) -> int:
    # quantized::linear*(X, packed, ...): out has N features per row, each a K-long dot product
    return 2 * out_val.numel() * x.shape[-1]


def _quantized_conv_flops(x, packed, *args, out_val=None, **kwargs) -> int:
    weight = packed.unpack()[0]  # (C_out, C_in / groups, *kernel)
    return 2 * out_val.numel() * weight[0].numel()


for _f in (_quantized_linear_flops, _quantized_conv_flops):
    _f._get_raw = True  # FlopCounterMode passes raw tensors (not shapes) to these


def _extra_formulas() -> dict[Any, Any]:
    formulas: dict[Any, Any] = {}
    aten, quantized = torch.ops.aten, torch.ops.quantized
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    for name in ("linear", "linear_dynamic", "linear_relu", "linear_relu_dynamic"):
        with contextlib.suppress(AttributeError, RuntimeError):
            formulas[getattr(quantized, name)] = _quantized_linear_flops
    for name in ("conv1d", "conv2d", "conv3d", "conv2d_relu"):
        with contextlib.suppress(AttributeError, RuntimeError):
            formulas[getattr(quantized, name)] = _quantized_conv_flops
    return formulas


class _UncountedOpSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records heavy-looking ops that have no flop formula."""

    def __init__(self, known: set[Any]):
        super().__init__()
        self.known = known
        self.seen: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet not in self.known:
            name = str(packet)
            if _HEAVY_OP_TOKENS.intersection(name.split(".")[-1].split("_")):
                self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _mha_fastpath_disabled():
    # nn.MultiheadAttention / TransformerEncoderLayer in eval mode otherwise run one fused op
    # (_native_multi_head_attention) that hides their matmuls from the counter.
    backend = getattr(torch.backends, "mha", None)
    if backend is None or not hasattr(backend, "set_fastpath_enabled"):
        yield
        return
    previous = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(previous)


def _self_macs(flop_counts: dict[str, dict[Any, int]], root_prefix: str) -> dict[str, int]:
    """Turn FlopCounterMode's inclusive per-module FLOPs into each module's own MACs."""
    inclusive: dict[str, int] = {}
    for key, ops in flop_counts.items():
        if key == "Global":
            continue
        if key == root_prefix:
            name = ""
        elif key.startswith(root_prefix + "."):
            name = key[len(root_prefix) + 1:]
        else:  # a module outside the model's tree (built on the fly); its parent keeps the MACs
            continue
        inclusive[name] = inclusive.get(name, 0) + sum(ops.values()) // 2
    own = dict(inclusive)
    for name, macs in inclusive.items():
        if name == "":
            continue
        parent = name
        while parent:  # nearest tracked ancestor (containers such as ModuleList are never called)
            parent = parent.rpartition(".")[0]
            if parent in inclusive:
                own[parent] -= macs
                break
    return {(name or ROOT): macs for name, macs in own.items() if macs}


def _nonzero_fraction(module: nn.Module) -> float | None:
    """Non-zero fraction of a weight-bound layer's weight; None for other modules."""
    weight_bound = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or \
        type(module).__name__ == "Conv1D"  # Hugging Face GPT-2 style linear
    weight = getattr(module, "weight", None)
    if not weight_bound or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        return None
    return int(torch.count_nonzero(weight.detach())) / weight.numel()


def count_macs(model: nn.Module, example_inputs: Any) -> MacReport:
    """Count the MACs of ``model`` on ``example_inputs`` (one forward, no grad, eval mode).

    The model's training flag is restored afterwards. MACs scale with the batch size of
    ``example_inputs``; pass a batch of one for per-sample numbers.
    """
    formulas = _extra_formulas()
    counter = FlopCounterMode(display=False, custom_mapping=formulas)
    spy = _UncountedOpSpy(set(counter.flop_registry))
    was_training = model.training
    model.eval()
    try:
        with _mha_fastpath_disabled(), torch.no_grad(), counter, spy:
            call_model(model, example_inputs)
    except Exception as exc:
        raise UnsupportedError(
            f"counting MACs failed: the forward raised {type(exc).__name__}: {exc}",
            hint="check that example_inputs match the model's forward signature",
        ) from exc
    finally:
        model.train(was_training)

    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    own = _self_macs(counter.get_flop_counts(), type(model).__name__)
    by_layer = dict(sorted(own.items(), key=lambda kv: order.get(kv[0], -1)))  # forward order
    total = counter.get_total_flops() // 2
    effective = total
    for name, macs in by_layer.items():
        module = model if name == ROOT else modules.get(name)
        fraction = _nonzero_fraction(module) if module is not None else None
        if fraction is not None:
            effective -= macs - round(macs * fraction)
    return MacReport(total=total, by_layer=by_layer, effective_total=effective,
                     uncounted_ops=spy.seen)
