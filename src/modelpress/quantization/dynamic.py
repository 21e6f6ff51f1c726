"""Dynamic int8 quantization of Linear layers (``quant.dynamic_int8``), for Linear-heavy models.

Every selected ``nn.Linear`` becomes a :class:`DynamicInt8Linear`: int8 weights (symmetric,
one fp32 scale per output channel or per tensor) stored as plain buffers, so the artifact
holds int8 (4x smaller than fp32 for the weights). Activations are quantized at run time,
per call, from their own range: no calibration data is needed.

    >>> import torch
    >>> from modelpress import quantize
    >>> from modelpress.quantization.dynamic import DynamicInt8
    >>> from modelpress.quantization.primitives import sqnr
    >>> m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    >>> q = quantize(m, DynamicInt8())
    >>> type(q[0]).__name__, q[0].weight_int8.dtype
    ('DynamicInt8Linear', torch.int8)
    >>> x = torch.randn(32, 64)
    >>> sqnr(m(x), q(x)) > 30
    True

**Kernel** (measured on an AMD Zen 3, AVX2 without VNNI, torch 2.13.0+cpu, 1 thread, batch 32,
MiniLM shapes 384->384 / 384->1536 / 1536->384 at 14 and 128 tokens, fp32 ``F.linear`` (MKL) as
the reference, ratio = fp32 time / int8 time from ``compare_latency``; reproduce with
``python benchmarks/quant_dynamic.py --kernels``):

* fbgemm ``torch.ops.quantized.linear_dynamic`` on ``linear_prepack``-ed per-channel weights:
  **1.5-1.9x at 14 tokens, 1.6-2.0x at 128 tokens**. Used here.
* oneDNN (``linear_dynamic`` with the ``onednn`` engine, or ``onednn.qlinear_pointwise`` after
  ``quantize_per_tensor_dynamic``): 1.2-1.8x, and its 8-bit activations saturate (18-22 dB).
* ``torch._int_mm`` (int8 x int8 -> int32) with per-row activation scales, and the weight-only
  ``aten._weight_int8pack_mm``: 30-50x *slower* than fp32 on this CPU (no optimised x86 kernel).

Without VNNI the int8 kernels sum two u8*s8 products into a saturating int16 (``vpmaddubsw``), so
8-bit activations times 8-bit weights overflow (output SQNR 18-22 dB on Gaussian data). One
operand must lose a bit: ``advanced.reduce_range="weights"`` (the default, ONNX Runtime's
choice: weights in [-63, 63], activations keep 8 bits) or ``"activations"`` (torch.ao's
choice). On MiniLM (bundled STS pairs, fidelity = mean cosine to fp32) one activation scale
per tensor gives fidelity 0.9925 with 7-bit weights but 0.977 with 7-bit activations; ``"none"``
is for CPUs with VNNI (or ARM/qnnpack).

**Per-row activations** (``activations="row"``): one token with large activations costs every
other token resolution under a per-tensor scale. A Linear is linear per row, so dividing each row
by its absolute maximum before the kernel and multiplying the output row back (bias added after,
in place) gives per-row scales with the same int8 GEMM: MiniLM fidelity 0.9965 instead of
0.9925, for 5-10% more time (extra passes over activations). The default is one scale per tensor.

**Fallback**: when the fast kernel cannot run (no fbgemm/qnnpack build, a non-CPU or
non-float32 input, an input that needs a gradient, ONNX export/tracing), the layer
dequantizes its weight once (cached, not saved) and calls ``F.linear`` in float: same
speed and output as the fp32 layer up to weight rounding, no activation quantization.
``DynamicInt8Linear.kernel`` says which path a layer takes; ``info["fallback"]`` of the report lists
the layers that could not pack their weight. For an int8 ONNX model, export the float model
and use ONNX Runtime's ``quantize_dynamic`` (compared in the benchmark).

Linear subclasses whose owners read ``.weight`` directly (``nn.MultiheadAttention``'s
``out_proj``) are left in float and listed in ``info["skipped"]``. GPT-2's ``Conv1D`` is a Linear
here. ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` store their weight matrices as int8 (one scale per
row, :class:`~.rnn.QuantRNN`) and compute in float from them: there is no int8 recurrent kernel
to call, so they are listed in ``info["fallback"]``. Returns a new model
(the verbs copy; see :mod:`modelpress.api`); the result is for inference.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig, StrictModel
from ..core.errors import ScopeError
from ..core.scope import Scope, first_and_last
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import RECURRENT, linear_equivalent, overrides_forward, parent_reads_weight
from ..nn.modules import set_module
from ..nn.records import buildable
from .primitives import QuantSpec, quantize_tensor, sqnr
from .rnn import QuantRNN, rnn_weight_sqnr, unsupported_rnn

LAYER_TYPES = ("Linear",)
_TINY = torch.finfo(torch.float32).tiny
# Below this largest input magnitude the int8 kernel's per-tensor activation scale is floored: its
# error grows (2x at 3e-3) and inputs under ~1e-5 come out as zeros (random-init MobileNetV3's
# classifier input is ~1e-9). Such inputs take the float path on the dequantized weights.
_SMALL_RANGE = 1e-2


class DynamicInt8Advanced(StrictModel):
    """Rare knobs of :class:`DynamicInt8`."""

    reduce_range: Literal["weights", "activations", "none"] = Field(
        "weights", description="which operand gets 7 bits so the AVX2 int8 kernel (no VNNI) cannot saturate: "
                               "'weights' (ONNX Runtime's choice), 'activations' (torch.ao's) or 'none' (VNNI/ARM)")
    kernel: Literal["auto", "reference"] = Field("auto", description="'auto': fbgemm/qnnpack int8 GEMM when "
                                                 "available; 'reference': dequantize + float matmul")


class DynamicInt8(MethodConfig):
    """Int8 weights + activations quantized at run time (no data) for ``nn.Linear`` layers."""

    granularity: Literal["channel", "tensor"] = Field("channel", description="weight scales: one per output "
                                                                            "channel or one per tensor")
    activations: Literal["tensor", "row"] = Field("tensor", description="activation scales: one per row (token) "
                                                                     "or one per input tensor")
    scope: Scope = Scope()
    keep_first_last: bool = Field(False, description="leave the first and last Linear in float")
    embeddings: bool = Field(True, description="also store nn.Embedding tables as int8 (one scale per row); "
                                               "a lookup needs no GEMM, so this only saves bytes")
    advanced: DynamicInt8Advanced = Field(default_factory=DynamicInt8Advanced)


@contextlib.contextmanager
def _engine(name: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _pack_engine() -> str | None:
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("fbgemm", "x86", "qnnpack") if e in engines), None)


@buildable
class DynamicInt8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and run-time (dynamic) int8 activations.

    Buffers (all saved): ``weight_int8`` (int8, ``[out, in]``), ``weight_scale`` (fp32, ``[out]``
    or ``[1]``) and ``bias`` (fp32 or None). The packed fbgemm weight is built lazily on the
    first call and rebuilt after ``load_state_dict``; it is never saved.

        >>> import torch
        >>> lin = torch.nn.Linear(16, 8)
        >>> q = DynamicInt8Linear.from_linear(lin)
        >>> q(torch.randn(4, 16)).shape, q.kernel in ("fbgemm", "qnnpack", "reference")
        (torch.Size([4, 8]), True)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, granularity: str = "channel",
                 activations: str = "tensor", reduce_range: str = "weights", kernel: str = "auto"):
        super().__init__()
        for field, value, allowed in (("granularity", granularity, ("channel", "tensor")),
                                      ("activations", activations, ("row", "tensor")),
                                      ("reduce_range", reduce_range, ("weights", "activations", "none")),
                                      ("kernel", kernel, ("auto", "reference"))):
            if value not in allowed:  # a corrupt checkpoint record ends here (reported as ModelLoadError)
                raise ValueError(f"DynamicInt8Linear {field} must be one of {allowed}, got {value!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.granularity, self.activations = granularity, activations
        self.reduce_range, self.requested_kernel = reduce_range, kernel
        rows = self.out_features if granularity == "channel" else 1
        self.register_buffer("weight_int8", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(rows))
        self.register_buffer("bias", torch.zeros(self.out_features) if bias else None)
        self._drop_cache()

    # -- building ------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, granularity: str = "channel", activations: str = "tensor",
                    reduce_range: str = "weights", kernel: str = "auto") -> "DynamicInt8Linear":
        """Quantize ``linear``'s weight (symmetric, [-127, 127], or [-63, 63] when ``reduce_range='weights'``)."""
        w = linear.weight.detach().float().cpu()
        bits = 7 if reduce_range == "weights" else 8
        qt = quantize_tensor(w, QuantSpec(bits=bits, symmetric=True, granularity=granularity))
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, granularity,
                    activations, reduce_range, kernel)
        layer.weight_int8.copy_(qt.q)
        layer.weight_scale.copy_(qt.scale.reshape(-1))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float().cpu())
        return layer

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "granularity": self.granularity, "activations": self.activations,
                "reduce_range": self.reduce_range, "kernel": self.requested_kernel}

    @classmethod
    def from_spec(cls, args: dict) -> "DynamicInt8Linear":
        return cls(**args)

    # -- caches (never saved, dropped whenever the buffers may change) --------------------
    def _drop_cache(self) -> None:
        self._packed = None          # fbgemm/qnnpack packed weight, False when packing failed
        self._packed_key = None      # data pointers the packed weight was built from
        self._float_weight = None    # dequantized weight for the fallback path
        self._engine_name = "reference"
        self.fallback_reason: str | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._drop_cache()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # deepcopy / pickle: packed weights are rebuilt on demand
        state = dict(self.__dict__)
        state.update(_packed=None, _packed_key=None, _float_weight=None)
        return state

    def repack(self) -> "DynamicInt8Linear":
        """Rebuild the packed weight now (call after editing the buffers in place)."""
        self._drop_cache()
        self._packed_weight()
        return self

    def _key(self) -> tuple:
        return tuple(t.data_ptr() if t is not None else 0 for t in (self.weight_int8, self.weight_scale, self.bias))

    def _packed_weight(self):
        """The packed int8 weight, or None when the fast kernel is unavailable (reason recorded)."""
        if self.requested_kernel == "reference":
            self.fallback_reason = "kernel='reference' was asked for"
            return None
        key = self._key()
        if self._packed is not None and self._packed_key == key:
            return None if self._packed is False else self._packed
        self._packed, self._packed_key = False, key
        engine = _pack_engine()
        if engine is None or not hasattr(torch.ops.quantized, "linear_prepack"):
            self.fallback_reason = "this torch build has no fbgemm/qnnpack quantized engine"
            return None
        if self.weight_int8.device.type != "cpu":
            self.fallback_reason = f"weights are on {self.weight_int8.device.type}; the int8 kernel is CPU-only"
            return None
        try:
            with warnings.catch_warnings(), _engine(engine):
                warnings.simplefilter("ignore")  # quantized-tensor constructors are deprecated upstream
                scale = self.weight_scale.double()
                if self.granularity == "channel":
                    qw = torch._make_per_channel_quantized_tensor(
                        self.weight_int8, scale, torch.zeros(scale.numel(), dtype=torch.long), 0)
                else:
                    qw = torch._make_per_tensor_quantized_tensor(self.weight_int8, float(scale[0]), 0)
                bias = self.bias if self.activations == "tensor" else None  # row mode adds it after rescaling
                self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
            self.fallback_reason = f"packing the int8 weight failed: {str(exc).splitlines()[0][:200]}"
            return None
        self._engine_name = "qnnpack" if engine == "qnnpack" else "fbgemm"
        return self._packed

    @property
    def kernel(self) -> str:
        """``'fbgemm'`` / ``'qnnpack'`` (int8 GEMM) or ``'reference'`` (dequantize + float matmul)."""
        return self._engine_name if self._packed_weight() is not None else "reference"

    # -- forward ------------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale.reshape(-1, 1) if self.granularity == "channel" else self.weight_scale
        return self.weight_int8.float() * scale

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight (cached, not saved), for code that reads ``layer.weight``
        (e.g. ``nn.TransformerEncoderLayer``'s fused fast path, which then runs in float)."""
        if self._float_weight is None:
            self._float_weight = self.dequantized_weight()
        return self._float_weight

    def _fast_path_ok(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0:
            return False
        if x.requires_grad and torch.is_grad_enabled():  # the int8 op has no backward
            return False
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
            return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_weight() if self._fast_path_ok(x) else None
        if packed is None:
            return self._reference_forward(x)
        if self.activations == "tensor":
            lo, hi = torch.aminmax(x)  # one pass
            if max(float(hi), -float(lo)) < _SMALL_RANGE:
                return self._reference_forward(x)  # the kernel's activation scale cannot go that small
            return torch.ops.quantized.linear_dynamic(x, packed, self.reduce_range == "activations")
        # Per-row scales through a per-tensor kernel: rows scaled to |max| = 1, output rows scaled back.
        # The rescale writes into the kernel's output: a fresh output tensor cost 20% of MiniLM's time.
        r = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_(min=_TINY)
        y = torch.ops.quantized.linear_dynamic(x / r, packed, self.reduce_range == "activations")
        return y.mul_(r) if self.bias is None else torch.addcmul(self.bias, y, r, out=y)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            w = self.dequantized_weight()  # traced from the int8 buffers, not from a cached constant
        else:
            w = self._float_weight
            if w is None or w.device != x.device:
                w = self._float_weight = self.dequantized_weight().to(x.device)
        bias = self.bias
        if x.dtype != w.dtype:
            w, bias = w.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=int8/{self.granularity}, activations=dynamic/{self.activations}")


def _skip_reason(model: nn.Module, name: str, module: nn.Module) -> str | None:
    read = parent_reads_weight(model, name)
    if read is not None and not read.calls_layer:  # the int8 kernel would never run
        return read.reason
    if isinstance(module, nn.Linear) and overrides_forward(module, nn.Linear):
        return f"{type(module).__name__} overrides Linear.forward"
    if isinstance(module, nn.RNNBase):
        return unsupported_rnn(module)
    return None


def _int8_rnn(layer: nn.RNNBase, cfg: "DynamicInt8") -> tuple[QuantRNN, dict]:
    q = QuantRNN.from_rnn(layer, bits=8, granularity=cfg.granularity)
    params = sum(getattr(layer, n).numel() for n in q.weight_names)
    return q, {"params": params, "kernel": "reference", "weight_sqnr_db": round(rnn_weight_sqnr(layer, q), 2)}


@buildable
class Int8Embedding(nn.Module):
    """``nn.Embedding`` stored as int8 rows with one fp32 scale per row; a lookup dequantizes
    only the rows it reads. MiniLM's word table (30,522 x 384) goes from 46.9 MB to 11.8 MB.

        >>> import torch
        >>> emb = torch.nn.Embedding(100, 16)
        >>> q = Int8Embedding.from_embedding(emb)
        >>> ids = torch.tensor([[1, 2, 99]])
        >>> bool((q(ids) - emb(ids)).abs().max() <= q.weight_scale.max() / 2 + 1e-6)
        True
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        w = emb.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q.weight_int8.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        q.weight_scale.copy_(scale)
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    @property
    def weight(self) -> torch.Tensor:  # for code that reads emb.weight (e.g. tied output layers)
        return self.dequantized_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_int8).float() * F.embedding(ids, self.weight_scale[:, None])

    def spec(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    @classmethod
    def from_spec(cls, args: dict) -> "Int8Embedding":
        return cls(**args)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


@register_method("quant.dynamic_int8", DynamicInt8, layer_types=(*LAYER_TYPES, *RECURRENT, "Embedding"))
def dynamic_int8(model: nn.Module, cfg: DynamicInt8, inputs: MethodInputs) -> MethodResult:
    """Dynamic int8: Linear weights to int8, activations quantized per call (fbgemm int8 GEMM)."""
    types = (*LAYER_TYPES, *RECURRENT)
    default_exclude = first_and_last(model, types) if cfg.keep_first_last else []
    layers = cfg.scope.resolve(model, types, default_exclude=default_exclude)
    report, skipped, fallback = {}, {}, {}
    for name, layer in layers:
        reason = _skip_reason(model, name, layer)
        if reason:
            skipped[name] = reason
            continue
        if isinstance(layer, nn.RNNBase):
            q, report[name] = _int8_rnn(layer, cfg)
            fallback[name] = "no int8 recurrent kernel: int8 weights, float compute"
            set_module(model, name, q)
            continue
        layer = linear_equivalent(layer)  # GPT-2's Conv1D: the same map as an nn.Linear
        q = DynamicInt8Linear.from_linear(layer, cfg.granularity, cfg.activations, cfg.advanced.reduce_range,
                                          cfg.advanced.kernel)
        if q.kernel == "reference":
            fallback[name] = q.fallback_reason
        report[name] = {"params": layer.weight.numel(), "kernel": q.kernel,
                        "weight_sqnr_db": round(sqnr(layer.weight.detach().float().cpu(), q.dequantized_weight()), 2)}
        set_module(model, name, q)
    if not report:
        raise ScopeError(f"quant.dynamic_int8: none of the {len(layers)} selected layers can be replaced "
                         f"({'; '.join(f'{n}: {r}' for n, r in list(skipped.items())[:3])})",
                         hint="select plain nn.Linear layers with Scope(include=...)")
    embeddings = {}
    if cfg.embeddings:
        for name, emb in [(n, m) for n, m in model.named_modules() if type(m) is nn.Embedding]:
            if emb.max_norm is not None or emb.sparse:
                skipped[name] = "Embedding with max_norm / sparse gradients"
                continue
            set_module(model, name, Int8Embedding.from_embedding(emb))
            embeddings[name] = emb.weight.numel()
    if skipped:
        inputs.log(f"quant.dynamic_int8: left in float: {', '.join(skipped)}")
    if fallback:
        inputs.log(f"quant.dynamic_int8: {len(fallback)} layers use the float fallback "
                   f"({next(iter(fallback.values()))})")
    return MethodResult(model, {"layers": report, "embeddings": embeddings, "skipped": skipped, "fallback": fallback})
