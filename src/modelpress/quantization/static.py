"""Static W8A8 post-training quantization (``quant.static_int8``): calibrated int8 activations.

What it does, in order:

1. folds BatchNorm into the preceding Conv/Linear (:mod:`.fold`);
2. traces the model with ``torch.fx`` and puts a :class:`FakeQuant` on every activation tensor an
   int8 kernel reads or writes: the input of each selected Conv/Linear, its output (after the
   ReLU/ReLU6 that follows it, so the ReLU disappears into the output range, as in ONNX Runtime's
   QDQ fusion), both inputs and the output of residual adds, and average pools of quantized
   tensors. Shape-only ops (max-pool, flatten, view, ReLU) after a quantized tensor reuse its
   scale, so a deployed graph runs them in int8 too;
3. wraps each selected layer in :class:`QuantizedLayer`: weights quantized symmetric int8, per
   output channel by default (min/max or MSE ranges), bias rounded to the int32 grid of
   ``input scale * weight scale`` as int8 kernels do;
4. runs ``calibration_batches`` batches through it, feeding the activation observers
   (:mod:`.observers`), and turns their ranges into scales / zero points.

The result is a PyTorch fake-quant model (``torch.fx.GraphModule``): it computes in float what
the int8 deployment computes (quantize-dequantize at the same places with the same scales), so its
accuracy is the deployed accuracy; :func:`modelpress.export.onnx_quant.export_int8_onnx` writes it
as an ONNX QDQ model for ONNX Runtime. ``quantize`` returns a new model; the input is untouched.

    >>> import torch
    >>> from torch import nn
    >>> from modelpress import quantize
    >>> from modelpress.quantization.static import StaticInt8
    >>> from modelpress.quantization.primitives import sqnr
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(8 * 6 * 6, 4)).eval()
    >>> calib = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    >>> q = quantize(net, StaticInt8(observer="minmax"), calib)
    >>> x = torch.randn(32, 1, 8, 8)
    >>> sqnr(net(x), q(x)) > 25
    True
"""
from __future__ import annotations

import copy
import operator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import fx, nn

from ..core.config import MethodConfig
from ..core.data import as_data, check_finite, check_model_accepts
from ..core.errors import DataError, UnsupportedError
from ..core.scope import Scope
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import is_transposed_linear, parent_reads_weight, plain_linears
from ..nn.modules import set_module
from ..nn.records import mark_replay, register_replay
from .fold import fold_batchnorm
from .observers import ObserverName, make_observer
from .primitives import QuantSpec, broadcast_params, fake_quantize, minmax, qparams

LAYER_TYPES = ("Linear", "Conv1d", "Conv2d")
INT32 = (-(2 ** 31), 2 ** 31 - 1)


class StaticInt8(MethodConfig):
    """Static int8 weights and activations, calibrated on data (``quant.static_int8``).

    Defaults, measured with ``python benchmarks/quant_static.py`` (ONNX Runtime 1.32, AVX2 CPU
    without VNNI): all five observers land within 0.3 points of fp32 on LeNet-5 and resnet_small
    (1,000 test images: differences of 1-3 images); ``percentile`` is the default as it ties for
    best, is fast, and ignores rare outliers that stretch a min/max range. uint8 activations with
    int8 weights (u8s8) run fastest; uint8 weights (u8u8) were 1.4x and int8 activations
    (s8s8) 2.1x slower on resnet_small, slower than fp32 in both cases. ``reduce_range`` (7-bit
    weights) is needed on such CPUs: with full 8-bit weights the u8s8 kernels' int16 sums
    saturate and resnet_small fell from 98.3% to 93.8% in ONNX Runtime, at no speed difference.
    On VNNI / ARM CPUs set it False.
    """

    observer: ObserverName = Field("percentile", description="activation range observer")
    percentile: float = Field(99.99, gt=50, le=100, description="for observer='percentile'")
    weight_granularity: Literal["channel", "tensor"] = Field(
        "channel", description="one weight scale per output channel or per layer (symmetric int8)")
    weight_observer: Literal["minmax", "mse"] = Field("minmax", description="weight range observer")
    weight_symmetric: bool = Field(True, description="int8 weights with zero point 0 (else uint8 + zero point)")
    reduce_range: bool = Field(
        True, description="7-bit weights, so AVX2 int8 kernels without VNNI cannot overflow their int16 sums")
    activation_symmetric: bool = Field(
        False, description="int8 activations with zero point 0 instead of asymmetric uint8")
    calibration_batches: int = Field(8, ge=1, description="batches of data run for calibration")
    fold_bn: bool = Field(True, description="fold BatchNorm into the preceding Conv/Linear first")
    scope: Scope = Scope()

    def activation_spec(self) -> QuantSpec:
        sym = self.activation_symmetric
        return QuantSpec(bits=8, symmetric=sym, signed=sym)

    def weight_spec(self) -> QuantSpec:
        sym = self.weight_symmetric
        return QuantSpec(bits=7 if self.reduce_range else 8, symmetric=sym, signed=sym,
                         granularity=self.weight_granularity, axis=0)


def _export_fake_quantize(x, scale, zero, spec: QuantSpec, axis: int | None):
    """torch's fake-quant ops, which the ONNX exporter writes as QuantizeLinear/DequantizeLinear.

    Scale and zero point are rebuilt from Python numbers so the tracer records constants, not
    ops on buffers (the weight rewrite in :mod:`modelpress.export.onnx_quant` reads them)."""
    scale = torch.tensor(scale.reshape(-1).tolist(), dtype=torch.float32)
    zero = torch.tensor([int(round(z)) for z in zero.reshape(-1).tolist()], dtype=torch.int32)
    # the exporter knows only the full int8 / uint8 ranges; narrower specs (7-bit weights) have
    # scales that keep every value inside their own range anyway
    qmin, qmax = (-128, 127) if spec.signed else (0, 255)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero, axis, qmin, qmax)


class FakeQuant(nn.Module):
    """Quantize-dequantize one activation tensor with calibrated scale / zero point.

    ``calibrating=True``: pass through and feed the observer. ``share_from`` names another
    FakeQuant whose scale this one copies at :meth:`finalize` (shape-only ops keep the grid).
    """

    def __init__(self, spec: QuantSpec, observer: str = "minmax", options: dict | None = None,
                 share_from: str | None = None):
        super().__init__()
        self.spec, self.share_from = spec, share_from
        self.observer = None if share_from else make_observer(observer, spec, **(options or {}))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero", torch.zeros(1))
        self.calibrating = False

    def set_qparams(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.scale, self.zero = scale.detach().reshape(-1).float().clone(), zero.detach().reshape(-1).float().clone()

    def finalize(self) -> None:
        self.set_qparams(*self.observer.qparams())
        self.calibrating = False

    def _params(self, x):
        if self.spec.granularity == "tensor":
            return self.scale, self.zero
        return (broadcast_params(x, self.scale.reshape(-1, 1), self.spec),
                broadcast_params(x, self.zero.reshape(-1, 1), self.spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            if self.observer is not None:
                self.observer.update(x)
            return x
        if torch.onnx.is_in_onnx_export():
            axis = None if self.spec.granularity == "tensor" else self.spec.axis % x.dim()
            return _export_fake_quantize(x, self.scale, self.zero, self.spec, axis)
        return fake_quantize(x, *self._params(x), self.spec.qmin, self.spec.qmax)

    def extra_repr(self) -> str:
        kind = f"shares {self.share_from}" if self.share_from else type(self.observer).__name__
        return f"{'u' if not self.spec.signed else ''}int8, {kind}"


class QuantizedLayer(nn.Module):
    """A Conv1d/Conv2d/Linear with fake-quantized int8 weights and an int32-grid bias.

    ``input_quant`` names the :class:`FakeQuant` feeding it; :meth:`set_input_scale` rounds the
    bias to ``input scale * weight scale`` (what an int8 kernel adds to its int32 accumulator).
    """

    def __init__(self, layer: nn.Module, spec: QuantSpec, observer: str = "minmax", input_quant: str = ""):
        super().__init__()
        if isinstance(layer, nn.Conv2d | nn.Conv1d) and layer.padding_mode != "zeros":
            raise UnsupportedError(f"quant.static_int8: padding_mode={layer.padding_mode!r} is not supported",
                                   hint="use zero padding, or exclude the layer with scope")
        self.layer, self.spec, self.input_quant = layer, spec, input_quant
        lo, hi = (minmax(layer.weight, spec) if observer == "minmax"
                  else make_observer(observer, spec).observe(layer.weight))
        scale, zero = qparams(lo, hi, spec)
        self.register_buffer("w_scale", scale.reshape(-1))
        self.register_buffer("w_zero", zero.reshape(-1))
        self.register_buffer("bias_q", None)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight being quantized, for model code that reads ``layer.weight`` (its dtype,
        device or shape: Hugging Face ViT reads the patch projection's ``weight.dtype``)."""
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def set_input_scale(self, in_scale: torch.Tensor) -> None:
        bias = self.layer.bias
        if bias is None:
            return
        step = in_scale.reshape(()).float() * self.w_scale
        self.bias_q = (torch.clamp(torch.round(bias.detach() / step), *INT32) * step).detach()

    def quantized_weight(self) -> torch.Tensor:
        w = self.layer.weight
        if torch.onnx.is_in_onnx_export():
            axis = 0 if self.spec.granularity == "channel" else None
            return _export_fake_quantize(w, self.w_scale, self.w_zero, self.spec, axis)
        scale = broadcast_params(w, self.w_scale.reshape(-1, 1), self.spec)
        zero = broadcast_params(w, self.w_zero.reshape(-1, 1), self.spec)
        return fake_quantize(w, scale, zero, self.spec.qmin, self.spec.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        b = self.bias_q if self.bias_q is not None else self.layer.bias
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        return self.layer._conv_forward(x, w, b)


# -- where activations are quantized -------------------------------------------------------
_ACT_MODULES = (nn.ReLU, nn.ReLU6)
_ACT_FUNCS = (F.relu, torch.relu, F.relu6)
# ops that only move or select values (or ReLU, which keeps a grid containing 0): their output
# stays on their input's grid, so it reuses the input's scale
_SHAPE_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.ReLU)
_SHAPE_FUNCS = (torch.flatten, torch.reshape, F.max_pool1d, F.max_pool2d, F.relu, torch.relu)
_SHAPE_METHODS = ("view", "reshape", "flatten", "contiguous", "relu")
_ADDS = (operator.add, torch.add)
# averaging changes values, so it gets its own scale; quantized, it runs as an int8 kernel
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)
_POOL_FUNCS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d)


class _Inserter:
    """Walks the fx graph once, inserting FakeQuant nodes (see the module docstring, step 2)."""

    def __init__(self, gm: fx.GraphModule, layers: set[str], spec: QuantSpec, observer: str, options: dict):
        self.gm, self.layers, self.spec = gm, layers, spec
        self.observer, self.options = observer, options
        self.modules = dict(gm.named_modules())
        self.count = 0
        self.layer_inputs: dict[str, str] = {}

    def _module(self, node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def is_quant(self, node) -> bool:
        return isinstance(self._module(node), FakeQuant)

    def is_shape_op(self, node) -> bool:
        return (isinstance(self._module(node), _SHAPE_MODULES)
                or (node.op == "call_function" and node.target in _SHAPE_FUNCS)
                or (node.op == "call_method" and node.target in _SHAPE_METHODS)) \
            and bool(node.args) and isinstance(node.args[0], fx.Node)

    def is_activation(self, node) -> bool:
        return (isinstance(self._module(node), _ACT_MODULES)
                or (node.op == "call_function" and node.target in _ACT_FUNCS)
                or (node.op == "call_method" and node.target in ("relu", "relu6")))

    def is_add(self, node) -> bool:
        return ((node.op == "call_function" and node.target in _ADDS) or
                (node.op == "call_method" and node.target == "add")) and \
            len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])

    def is_avg_pool(self, node) -> bool:
        return (isinstance(self._module(node), _POOL_MODULES)
                or (node.op == "call_function" and node.target in _POOL_FUNCS)) \
            and bool(node.args) and isinstance(node.args[0], fx.Node)

    def reaches_quant(self, node) -> bool:
        """``node`` is a FakeQuant, or shape-only ops away from one."""
        while self.is_shape_op(node) and not self.is_quant(node):
            node = node.args[0]
        return self.is_quant(node)

    def quantize_output(self, node: fx.Node, share_from: str | None = None) -> fx.Node:
        name = f"act_quant_{self.count}"
        self.count += 1
        fq = FakeQuant(self.spec, self.observer, self.options, share_from=share_from)
        self.gm.add_submodule(name, fq)
        self.modules[name] = fq
        with self.gm.graph.inserting_after(node):
            q = self.gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        return q

    def ensure_quantized(self, node: fx.Node) -> fx.Node:
        if self.is_quant(node):
            return node
        # a shape op after a quantized tensor (or an average pool of one) shares its scale; after
        # a float one it is quantized at its output (a float max-pool first reads 4x fewer values)
        src = node.args[0] if node.args else None
        if self.is_shape_op(node) and (self.reaches_quant(src) or (
                self.is_avg_pool(src) and self.reaches_quant(src.args[0]))):
            src = self.modules[self.ensure_quantized(node.args[0]).target]
            return self.quantize_output(node, share_from=src.share_from or self._name_of(src))
        return self.quantize_output(node)

    def _name_of(self, module) -> str:
        return next(n for n, m in self.modules.items() if m is module)

    def quantize_result(self, node: fx.Node) -> None:
        users = list(node.users)
        if len(users) == 1 and self.is_activation(users[0]) and users[0].args[0] is node:
            node = users[0]  # the activation folds into the output range (ReLU: lo = 0)
        self.quantize_output(node)

    def run(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):  # Identity (folded BatchNorm) and Dropout are no-ops here
            if isinstance(self._module(node), nn.Identity | nn.Dropout):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target in self.layers:
                if not node.args or not isinstance(node.args[0], fx.Node) or len(node.args) > 1 or node.kwargs:
                    raise UnsupportedError(f"quant.static_int8: layer {node.target!r} is called with "
                                           "arguments it cannot quantize", hint="exclude it with scope")
                self.layer_inputs[node.target] = self.ensure_quantized(node.args[0]).target
                self.quantize_result(node)
            elif self.is_add(node) and all(self.reaches_quant(a) for a in node.args[:2]):
                for a in node.args[:2]:
                    self.ensure_quantized(a)
                self.quantize_result(node)
        graph.lint()
        self.gm.recompile()


def prepare_static(model: nn.Module, cfg: StaticInt8) -> tuple[nn.Module, dict]:
    """Fold BN, insert FakeQuant / QuantizedLayer (observers armed); returns the model and a report.

    A model torch.fx can trace gets quantizers on the graph's activation edges (step 2 of the module
    docstring); any other model (Hugging Face transformers: keyword inputs, Python control flow) is
    quantized layer by layer: each selected layer's input and weights (``report["capture"]`` says
    which happened)."""
    report: dict = {}
    if cfg.fold_bn:
        res = fold_batchnorm(model)
        model = res.model
        report.update(folded_bn=res.folded, kept_bn=res.kept, fold_note=res.note)
    model = model.eval()
    selected = cfg.scope.resolve(model, LAYER_TYPES)
    if any(is_transposed_linear(m) for _, m in selected):  # GPT-2's Conv1D: quantized as the nn.Linear it is
        model = copy.deepcopy(model)
        selected = plain_linears(model, cfg.scope.resolve(model, LAYER_TYPES))
    layers = [n for n, _ in selected]
    options = {"percentile": cfg.percentile} if cfg.observer == "percentile" else {}
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types on dynamic control flow
        first = (str(exc).splitlines() or [""])[0][:120]
        report["capture"] = f"layers (torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {first})"
        return _prepare_layers(model, layers, cfg, options, report), report
    report["capture"] = "graph"
    _bake_flag_inputs(gm)
    ins = _Inserter(gm, set(layers), cfg.activation_spec(), cfg.observer, options)
    ins.run()
    for name in layers:
        if name in ins.layer_inputs:
            set_module(gm, name, QuantizedLayer(gm.get_submodule(name), cfg.weight_spec(),
                                                 cfg.weight_observer, ins.layer_inputs[name]))
    report["quantized_layers"] = [n for n in layers if n in ins.layer_inputs]
    report["activation_quantizers"] = ins.count
    for m in gm.modules():
        if isinstance(m, FakeQuant):
            m.calibrating = True
    return gm, report


class InputQuantizedLayer(nn.Module):
    """A layer whose input is quantized in front of it: what :func:`prepare_static` builds, layer by
    layer, when the model cannot be traced as a graph (``input_quant`` then ``quantized``)."""

    def __init__(self, input_quant: FakeQuant, quantized: QuantizedLayer):
        super().__init__()
        self.input_quant, self.quantized = input_quant, quantized

    @property
    def weight(self) -> torch.Tensor:  # what model code reading layer.weight expects
        return self.quantized.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.quantized.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(self.input_quant(x))


def _bake_flag_inputs(gm: fx.GraphModule) -> None:
    """Graph inputs with a bool default (timm's ``forward(x, attn_mask=None, is_causal=False)``)
    become that constant: as inputs they reached the ONNX exporter's tracer as tensors
    (scaled_dot_product_attention's ``is_causal`` then failed)."""
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and node.args and isinstance(node.args[0], bool):
            value = node.args[0]
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a, n=node, v=value: v if a is n else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
            gm.graph.erase_node(node)
    gm.recompile()


def _prepare_layers(model: nn.Module, layers: list[str], cfg: StaticInt8, options: dict, report: dict) -> nn.Module:
    """Quantize each selected layer's input and weights, without a graph: works on any model (dict
    inputs, Python control flow) at the cost of the graph mode's output and residual quantizers."""
    model = copy.deepcopy(model)  # like fx.symbolic_trace, leave the caller's modules alone
    done, skipped = [], {}
    for name in layers:
        read = parent_reads_weight(model, name)
        if read is not None:  # its parent would bypass the input quantizer (or read a wrapper's weight)
            skipped[name] = read.reason
            continue
        fq = FakeQuant(cfg.activation_spec(), cfg.observer, options)
        ql = QuantizedLayer(model.get_submodule(name), cfg.weight_spec(), cfg.weight_observer, f"{name}.input_quant")
        set_module(model, name, InputQuantizedLayer(fq, ql))
        fq.calibrating = True
        done.append(name)
    report["quantized_layers"], report["activation_quantizers"] = done, len(done)
    if skipped:
        report["skipped"] = skipped
    return model


@torch.no_grad()
def calibrate(gm: nn.Module, data, batches: int) -> int:
    """Run up to ``batches`` batches of ``data`` (inputs only) through ``gm``; returns how many ran."""
    it = as_data(data).inputs()
    n = 0
    while n < batches:
        try:
            inputs = next(it)
        except StopIteration:
            break
        except DataError as exc:
            if n:
                raise
            raise DataError("quant.static_int8: the calibration data is empty (no batch)",
                            hint="pass calibration batches, e.g. a few hundred training images") from exc
        check_finite(inputs, "quant.static_int8 calibration")
        check_model_accepts(gm, inputs, "quant.static_int8 calibration")  # runs it: a bad shape is one line
        n += 1
    return n


def finalize(gm: nn.Module) -> None:
    """Observer ranges -> scales; shared quantizers copy theirs; layers round their bias."""
    quants = {n: m for n, m in gm.named_modules() if isinstance(m, FakeQuant)}
    for m in quants.values():
        if m.share_from is None:
            m.finalize()
    for m in quants.values():
        if m.share_from is not None:
            owner = quants[m.share_from]
            m.set_qparams(owner.scale, owner.zero)
            m.calibrating = False
    for m in gm.modules():
        if isinstance(m, QuantizedLayer):
            m.set_input_scale(quants[m.input_quant].scale)


@register_method("quant.static_int8", StaticInt8, needs_data=True, layer_types=LAYER_TYPES)
def static_int8(model: nn.Module, cfg: StaticInt8, inputs: MethodInputs) -> MethodResult:
    """Static int8 weights + activations calibrated on data (fake-quant model, ONNX QDQ export)."""
    gm, report = prepare_static(model, cfg)  # works on a copy: `model` keeps its structure
    mark_replay(gm, model, "quant.static_int8", cfg.to_dict())  # so artifacts of gm reload
    gm.train(False)
    report["calibration_batches"] = calibrate(gm, inputs.data, cfg.calibration_batches)
    finalize(gm)
    report["observer"] = cfg.observer
    if report.get("fold_note"):
        inputs.log(report["fold_note"])
    return MethodResult(gm.eval(), report)


def _replay(model: nn.Module, config: dict) -> nn.Module:
    """Redo the rewrite when an artifact is loaded; calibrated scales then come from its state_dict."""
    gm, _ = prepare_static(model, StaticInt8.from_dict(config, where="artifact replay of quant.static_int8"))
    for m in gm.modules():
        if isinstance(m, FakeQuant):
            m.calibrating = False  # prepare arms the observers; here the ranges are already known
        if isinstance(m, QuantizedLayer):
            m.set_input_scale(torch.ones(1))  # creates the bias_q buffer the state_dict fills
    return gm.eval()


register_replay("quant.static_int8", _replay)
