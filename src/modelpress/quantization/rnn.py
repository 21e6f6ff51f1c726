"""Recurrent layers with packed weights: :class:`QuantRNN` (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``).

Every weight matrix of the layer (``weight_ih_l0``, ``weight_hh_l0``, ... and ``_reverse`` when
bidirectional) is stored as ``bits``-bit integers with one fp32 scale per row (a gate unit), per
tensor or per group, exactly as :class:`~.modules.QuantLinear` stores its weight; the biases stay
float. The forward pass dequantizes the matrices once (cached, rebuilt when a buffer changes) and
runs torch's own recurrent kernel on them (``torch.func.functional_call`` of a weightless twin on
the ``meta`` device), so packed sequences, ``hx``, ``batch_first``, dropout and projections behave
as in the float layer. There is no integer recurrent kernel: compute stays float; the artifact
holds the integers.

The layer still looks like the one it replaced: ``input_size``, ``hidden_size``, ``num_layers``,
``batch_first``, ``bidirectional``, ``proj_size``, ``mode`` and each weight by its name
(``q.weight_ih_l0``: the dequantized matrix) read as on the float layer.

    >>> import torch
    >>> from torch import nn
    >>> lstm = nn.LSTM(16, 32, batch_first=True)
    >>> q = QuantRNN.from_rnn(lstm, bits=8)
    >>> x = torch.randn(2, 5, 16)
    >>> out, (h, c) = q(x)
    >>> out.shape, q.weight_hh_l0.shape, bool((out - lstm(x)[0]).abs().max() < 0.02)
    (torch.Size([2, 5, 32]), torch.Size([128, 32]), True)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..nn.layer_kinds import recurrent_weight_names
from ..nn.records import buildable
from .modules import _PackedWeight, weight_spec
from .primitives import QuantizedTensor, QuantSpec, quantize_tensor, sqnr

# torch's mode name -> class (and the nonlinearity of nn.RNN)
_MODES = {"LSTM": (nn.LSTM, None), "GRU": (nn.GRU, None), "RNN_TANH": (nn.RNN, "tanh"), "RNN_RELU": (nn.RNN, "relu")}


def unsupported_rnn(rnn: nn.RNNBase) -> str | None:
    """Why :class:`QuantRNN` cannot stand in for ``rnn`` (a subclass with its own forward), or None."""
    base = _MODES.get(rnn.mode, (None,))[0]
    if base is None or not isinstance(rnn, base):
        return f"{type(rnn).__name__} (mode {rnn.mode!r}) is not an nn.LSTM, nn.GRU or nn.RNN"
    if type(rnn).forward is not base.forward:
        return f"{type(rnn).__name__} overrides {base.__name__}.forward"
    return None


class PackedMatrix(_PackedWeight):
    """The packed storage of one weight matrix of a :class:`QuantRNN` (no forward of its own)."""

    def __init__(self, rows: int, cols: int, bits: int, granularity: str, group_size: int, symmetric: bool):
        super().__init__()
        self.weight_shape = (rows, cols)
        self._init_storage(bits, granularity, group_size, symmetric, bias=False, act_bits=None)


def _float_twin(mode: str, **geometry) -> nn.RNNBase:
    cls, nonlinearity = _MODES[mode]
    extra = {"nonlinearity": nonlinearity} if nonlinearity else {}
    if cls is nn.LSTM:
        extra["proj_size"] = geometry.pop("proj_size")
    else:
        geometry.pop("proj_size")
    return cls(**geometry, **extra, device="meta")


@buildable
class QuantRNN(nn.Module):
    """An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with packed ``bits``-bit weight matrices (see the module docstring)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 bits: int = 8, granularity: str = "channel", group_size: int = 128, symmetric: bool = True):
        super().__init__()
        if mode not in _MODES:  # a corrupt checkpoint record ends here (reported as ModelLoadError)
            raise ValueError(f"QuantRNN mode must be one of {sorted(_MODES)}, got {mode!r}")
        self.mode, self.input_size, self.hidden_size, self.num_layers = mode, input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.qspec = weight_spec(bits, granularity, group_size, symmetric)
        twin = _float_twin(mode, input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, bias=bias,
                           batch_first=batch_first, dropout=dropout, bidirectional=bidirectional, proj_size=proj_size)
        self.__dict__["_twin"] = twin  # not a submodule: it holds no tensors of its own and is never saved
        self.packed = nn.ModuleDict({
            name: PackedMatrix(*getattr(twin, name).shape, bits, granularity, group_size, symmetric)
            for name in recurrent_weight_names(twin)})
        for name in twin._flat_weights_names:
            if name.startswith("bias_"):
                self.register_parameter(name, nn.Parameter(torch.zeros(getattr(twin, name).shape)))

    @classmethod
    @torch.no_grad()
    def from_rnn(cls, rnn: nn.RNNBase, bits: int = 8, granularity: str = "channel", group_size: int = 128,
                 symmetric: bool = True,
                 quantize: Callable[[torch.Tensor, QuantSpec], QuantizedTensor] | None = None) -> "QuantRNN":
        """The packed copy of ``rnn``: round-to-nearest unless ``quantize(weight, spec)`` says otherwise.

        ``granularity="group"`` falls back to ``"channel"`` for the whole layer when ``group_size``
        does not divide the inputs of every matrix (``q.qspec.granularity`` says which was used).
        """
        names = recurrent_weight_names(rnn)
        fits = all(getattr(rnn, n).shape[1] % group_size == 0 for n in names)
        used = "channel" if granularity == "group" and not fits else granularity
        q = cls(rnn.mode, rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first, rnn.dropout,
                rnn.bidirectional, getattr(rnn, "proj_size", 0), bits, used, group_size, symmetric)
        quantize = quantize or quantize_tensor
        for name in names:
            w = getattr(rnn, name).detach().float().cpu()
            q.packed[name].set_weight(quantize(w, q.qspec))
        for name, p in q.named_parameters(recurse=False):
            p.copy_(getattr(rnn, name).detach().float().cpu())
        return q.to(getattr(rnn, names[0]).device)

    @property
    def weight_names(self) -> list[str]:
        return list(self.packed.keys())

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            packed = self.__dict__.get("_modules", {}).get("packed")
            if packed is not None and name in packed:  # q.weight_ih_l0: the float matrix the layer uses
                return packed[name].dequantized_weight()
            raise

    @torch.no_grad()
    def to_float(self) -> nn.RNNBase:
        """The plain ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` holding the dequantized weights: what this
        layer computes, in the form ONNX exporters know (they cannot trace ``functional_call``)."""
        device = next(iter(self.packed.values())).dequantized_weight().device
        rnn = _float_twin(self.mode, input_size=self.input_size, hidden_size=self.hidden_size,
                          num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                          dropout=self.dropout, bidirectional=self.bidirectional,
                          proj_size=self.proj_size).to_empty(device=device)
        for name in rnn._flat_weights_names:
            source = self.packed[name].dequantized_weight() if name in self.packed else getattr(self, name)
            getattr(rnn, name).copy_(source)
        return rnn.train(self.training)

    def forward(self, input, hx=None):
        tensors = {name: m.dequantized_weight() for name, m in self.packed.items()}
        tensors.update(self.named_parameters(recurse=False))
        twin = self._twin.train(self.training)
        return functional_call(twin, tensors, (input,) if hx is None else (input, hx))

    def spec(self) -> dict:  # recorded in artifacts (see modelpress.nn.records)
        return {"mode": self.mode, "input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.bias, "batch_first": self.batch_first,
                "dropout": self.dropout, "bidirectional": self.bidirectional, "proj_size": self.proj_size,
                "bits": self.qspec.bits, "granularity": self.qspec.granularity, "group_size": self.qspec.group_size,
                "symmetric": self.qspec.symmetric}

    @classmethod
    def from_spec(cls, args: dict) -> "QuantRNN":
        return cls(**args)

    def extra_repr(self) -> str:
        return (f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, bits={self.qspec.bits}, granularity={self.qspec.granularity}")


def rnn_weight_sqnr(rnn: nn.RNNBase, q: QuantRNN) -> float:
    """SQNR (dB) of all of ``q``'s dequantized matrices against ``rnn``'s float ones, together."""
    ref = torch.cat([getattr(rnn, n).detach().float().cpu().reshape(-1) for n in q.weight_names])
    got = torch.cat([getattr(q, n).detach().float().cpu().reshape(-1) for n in q.weight_names])
    return sqnr(ref, got)
