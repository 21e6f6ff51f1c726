"""Per-input-channel scales moved into the op that produces a layer's input (AWQ, SmoothQuant).

Both methods multiply column ``j`` of a layer's weight by ``s_j`` and divide the layer's input
channel ``j`` by ``s_j``: the product is the same, but the weight (AWQ: its salient channels) or
the activation (SmoothQuant: its outlier channels) becomes easier to quantize. The division is
free when it can be *folded* into the op that produces the input: a norm's affine weight
(LayerNorm, RMSNorm: ``weight[j] /= s_j``, ``bias[j] /= s_j``) or a Linear's output rows
(``W[j, :] /= s_j``, ``b[j] /= s_j``), e.g. a decoder's ``input_layernorm`` before q/k/v, or
``up_proj`` before ``down_proj`` (the MLP's input is ``act(gate) * up``: linear in ``up``).

Which op produces which input is found on the model itself, not from its module names:
:func:`find_folds` runs one forward pass with autograd recording, walks back from each layer's
input through the recorded graph to the nearest norm / Linear with as many output channels, and
*proves* each candidate: it folds random scales into it (and into every layer reading the
same input), runs the model again and keeps the fold only when the output did not move. A norm
whose output also feeds a residual (BERT's post-norm blocks) or a Linear behind a non-linearity
fails that test and the layers get no producer (:class:`Fold` with ``producer=None``); the
method then decides (AWQ leaves the scales at 1; SmoothQuant divides the input explicitly with
an :class:`InputScale` in front of the layer, one ``Mul`` in the deployed graph).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.data import _tensors, call_model
from ..nn.layer_kinds import is_transposed_linear
from ..nn.records import buildable

#: how many producer candidates are tried per input (nearest first)
MAX_CANDIDATES = 4
#: graph nodes visited when walking back from one input
MAX_NODES = 64


@dataclass
class Fold:
    """Layers reading one input tensor (``consumers``, in call order) and the module that
    produces it, or None when no fold keeps the model's output unchanged."""

    consumers: list[str]
    producer: str | None = None
    tried: list[str] = field(default_factory=list)


def _is_norm(module: nn.Module, channels: int) -> bool:
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    return (not isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(w, torch.Tensor) and w.dim() == 1
            and w.numel() == channels and (b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape))
            and not isinstance(module, nn.modules.batchnorm._BatchNorm))


def _out_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_transposed_linear(module):
        return int(module.weight.shape[1])
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return int(w.numel())
    return None


def _foldable(module: nn.Module, channels: int) -> bool:
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return _out_channels(module) == channels
    return _is_norm(module, channels)


def untie(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    """Give each of ``modules`` its own copy of a weight / bias it shares with another module of
    ``model`` (GPT-2's ``lm_head`` reads the token embedding's matrix): scaling its columns must
    not rescale the embedding too. Returns the names of the parameters copied."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    names = {id(m): n for n, m in model.named_modules()}
    copied = []
    for m in modules:
        for attr in ("weight", "bias"):
            p = m._parameters.get(attr)
            if p is not None and len(owners.get(id(p), ())) > 1:
                setattr(m, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                copied.append(f"{names.get(id(m), '?')}.{attr}")
    return copied


@torch.no_grad()
def scale_producer(module: nn.Module, s: torch.Tensor) -> None:
    """Divide output channel ``j`` of ``module`` (norm or Linear) by ``s_j``, in place."""
    s = s.to(module.weight.device, module.weight.dtype)
    if isinstance(module, nn.Linear):
        module.weight.div_(s[:, None])
    elif is_transposed_linear(module):
        module.weight.div_(s[None, :])
    else:
        module.weight.div_(s)
    if getattr(module, "bias", None) is not None:
        module.bias.div_(s)


@torch.no_grad()
def scale_consumer(module: nn.Module, s: torch.Tensor) -> None:
    """Multiply input channel ``j`` of a Linear's weight by ``s_j``, in place."""
    s = s.to(module.weight.device, module.weight.dtype)
    if is_transposed_linear(module):
        module.weight.mul_(s[:, None])
    else:
        module.weight.mul_(s[None, :])


def in_channels(module: nn.Module) -> int:
    return int(module.weight.shape[0] if is_transposed_linear(module) else module.weight.shape[1])


def _outputs(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    return [t.detach().float() for t in _tensors(call_model(model, batch)) if t.is_floating_point()]


def _moved(ref: list[torch.Tensor], out: list[torch.Tensor], tol: float) -> bool:
    if len(ref) != len(out):
        return True
    for a, b in zip(ref, out):
        if a.shape != b.shape or not torch.isfinite(b).all():
            return True
        if float((a - b).norm()) > tol * (float(a.norm()) + 1e-12):
            return True
    return False


def _walk(start, owners: dict[Any, str], modules: dict[str, nn.Module], channels: int) -> list[str]:
    """Modules that could produce the tensor whose autograd node is ``start``, nearest first."""
    found, seen, queue = [], set(), [start]
    while queue and len(seen) < MAX_NODES and len(found) < MAX_CANDIDATES:
        node = queue.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        name = owners.get(node)
        if name is not None:
            if _foldable(modules[name], channels):
                found.append(name)
            continue  # never walk through a module: its output is not linear in its input's producer
        queue.extend(nxt for nxt, _ in getattr(node, "next_functions", ()))
    return found


@torch.no_grad()
def _proves(model: nn.Module, producer: nn.Module, consumers: list[nn.Module], batch: Any,
            ref: list[torch.Tensor], tol: float) -> bool:
    """Whether folding random scales into ``producer`` and ``consumers`` leaves the output as it was."""
    params = [p for m in (producer, *consumers) for p in (m.weight, getattr(m, "bias", None)) if p is not None]
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(in_channels(consumers[0])).uniform_(-1.0, 1.0, generator=g))
    try:
        scale_producer(producer, s)
        for c in consumers:
            scale_consumer(c, s)
        return not _moved(ref, _outputs(model, batch), tol)
    finally:
        for p, v in zip(params, saved):
            p.copy_(v)


def find_folds(model: nn.Module, layers: dict[str, nn.Module], batch: Any, tol: float = 1e-3) -> list[Fold]:
    """Group ``layers`` (Linear) by the input tensor they read on ``batch`` and find, for each
    group, the norm or Linear that scales can be folded into without changing the model's output."""
    inputs: dict[str, torch.Tensor] = {}
    owners: dict[Any, str] = {}
    modules = dict(model.named_modules())
    handles = []

    def pre(name):
        def fn(_m, args):
            if name not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0]
        return fn

    def post(name):
        def fn(_m, _args, out):
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                owners.setdefault(out.grad_fn, name)
        return fn

    for name, m in modules.items():
        if name and _out_channels(m) is not None:
            handles.append(m.register_forward_hook(post(name)))
    handles += [m.register_forward_pre_hook(pre(n)) for n, m in layers.items()]
    was_training = model.training
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        for p in grads:
            p.requires_grad_(p.is_floating_point())
        with torch.enable_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        for p, g in grads.items():
            p.requires_grad_(g)
    try:
        groups: list[tuple[torch.Tensor, list[str]]] = []
        for name in inputs:  # call order
            x = inputs[name]
            for held, names in groups:
                if held is x:
                    names.append(name)
                    break
            else:
                groups.append((x, [name]))
        ref = _outputs(model, batch)
        folds = []
        for x, names in groups:
            fold = Fold(names)
            channels = x.shape[-1]
            if x.grad_fn is not None and all(in_channels(layers[n]) == channels for n in names):
                for cand in _walk(x.grad_fn, owners, modules, channels):
                    if cand in names:
                        continue
                    fold.tried.append(cand)
                    if _proves(model, modules[cand], [layers[n] for n in names], batch, ref, tol):
                        fold.producer = cand
                        break
            folds.append(fold)
        return folds
    finally:
        model.train(was_training)


@buildable
class InputScale(nn.Module):
    """``layer(x * inv_scale)``: an input divided per channel in front of its layer, for layers
    whose input producer cannot absorb the scales (SmoothQuant on a post-norm block)."""

    def __init__(self, layer: nn.Module, channels: int | None = None):
        super().__init__()
        self.layer = layer
        n = channels if channels is not None else in_channels(layer)
        self.register_buffer("inv_scale", torch.ones(n))

    @property
    def weight(self) -> torch.Tensor:  # model code reading layer.weight (dtype, device) still works
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x * self.inv_scale.to(x.dtype))

    def spec(self) -> dict:
        return {"channels": int(self.inv_scale.numel()), "in_features": in_channels(self.layer),
                "out_features": int(self.layer.weight.shape[0]), "bias": self.layer.bias is not None}

    @classmethod
    def from_spec(cls, args: dict) -> "InputScale":
        return cls(nn.Linear(args["in_features"], args["out_features"], bias=args["bias"]), args["channels"])
