"""Layer-by-layer calibration: the driver of the one-shot methods that compress each layer from
statistics of its own inputs (``quant.gptq``, ``quant.awq``, ``quant.smoothquant``, ``prune.sparsegpt``,
``prune.wanda``).

:func:`calibrate_layerwise` visits the selected layers in the order the model calls them, in
groups of layers that read the same input tensor (an attention block's q, k and v; a gated MLP's
gate and up). For each group it runs the calibration batches through the model *as already
compressed*, so every layer sees the outputs of its compressed predecessors (GPTQ's sequential
mode), hands each input of each layer of the group to that layer's observer as rows
``(tokens, features)``, and stops the forward pass as soon as the group has run (layers after it
are not needed yet). Then the method compresses the group in place and the next group is
observed. Memory: the calibration inputs, one batch's activations and one group's statistics
(e.g. one Hessian per layer of the group); nothing is kept per layer of the whole model.

Rows come from a ``Linear``'s (or GPT-2 ``Conv1D``'s) input flattened over every dimension but the last, and from a
``Conv2d``'s input unfolded into patches (``in * kh * kw`` features, the layout of its
weight's inputs). When the inputs are a dict with an ``attention_mask`` (Hugging Face), rows of
padded positions are left out. A layer the calibration data never reaches is reported, not
compressed; a layer the model calls more than once per forward (shared weights) is observed over
all its calls.

An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` is observed as a whole (its calls' inputs are kept) and
compressed matrix by matrix with :func:`recurrent_rows`: the inputs of layer ``k``'s matrices
(the layer's input sequence for ``weight_ih``, the previous hidden state for ``weight_hh``) are
recomputed from the layers below as compressed so far.

The statistics an observer keeps are the method's business: :class:`Hessian` (``X^T X`` summed,
GPTQ / SparseGPT) and :class:`InputNorms` (per-feature sum of squares, Wanda) live here because
several methods share them.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..core.data import as_data, call_model, check_finite, tensor_bytes, to_device
from ..core.errors import DataError, UnsupportedError
from ..core.progress import progress_bar
from ..nn.layer_kinds import is_transposed_linear, linear_features
from .offload import DiskOffload, Offload, layer_bytes, release_free_memory, should_offload


class Observer(Protocol):
    def observe(self, rows: torch.Tensor) -> None:
        """Take one batch of a layer's inputs as ``(rows, features)``."""


class Hessian:
    """``H = 2/n * sum x x^T`` over every input row ``x`` of a layer (float64 accumulation on the
    layer's device), the proxy Hessian of the layer's squared output error (GPTQ, SparseGPT)."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.rows = 0

    def observe(self, rows: torch.Tensor) -> None:
        r = rows.to(self.sum.device, torch.float64)
        self.sum.addmm_(r.t(), r)
        self.rows += r.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.rows, 1))

    @staticmethod
    def bytes_for(features: int) -> int:
        return features * features * 8


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, where: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (GPTQ, SparseGPT), float64.

    Inputs that are always zero (a zero diagonal entry) get a unit diagonal, so the factor exists;
    a nearly singular ``H`` (few rows) gets a little more damping before giving up."""
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        try:
            if extra:
                h.diagonal().add_(extra * float(h.diagonal().mean()))
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        except torch.linalg.LinAlgError:  # not an allocation failure: that is no matter of damping
            continue
    raise DataError(f"{where}: the Hessian of the layer's inputs is not positive definite",
                    hint="use more calibration data, or a larger damp (e.g. 0.1)")


class InputNorms:
    """Per-feature L2 norm of a layer's inputs over all rows (Wanda's ``||X_j||``)."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.sq = torch.zeros(features, dtype=torch.float64, device=device)
        self.rows = 0

    def observe(self, rows: torch.Tensor) -> None:
        self.sq += rows.to(self.sq.device, torch.float64).pow(2).sum(0)
        self.rows += rows.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()

    @staticmethod
    def bytes_for(features: int) -> int:
        return features * 8


def input_features(layer: nn.Module) -> int:
    """Features per input row of ``layer`` (its weight's inputs: ``in * kh * kw`` for a conv)."""
    if isinstance(layer, nn.Conv2d):
        return int(layer.weight[0].numel())
    return linear_features(layer)[0]


def layer_rows(layer: nn.Module, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``layer``'s input ``x`` as ``(rows, features)`` in the order of its weight's inputs."""
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                           stride=layer.stride)                      # (N, C*kh*kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
        return x[token_mask.bool()]
    return x.reshape(-1, x.shape[-1])


def split_calibratable(selected) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """``(name, layer)`` pairs split into those calibrated layer by layer and ``{name: why not}``."""
    layers, skipped = [], {}
    for name, layer in selected:
        reason = check_layer(layer)
        if reason:
            skipped[name] = reason
        else:
            layers.append((name, layer))
    return layers, skipped


def check_layer(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be calibrated layer by layer, or None."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"grouped conv (groups={layer.groups})"
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return "conv padding other than explicit zeros"
        return None
    if isinstance(layer, nn.Linear) or is_transposed_linear(layer):
        return None
    if isinstance(layer, nn.RNNBase):
        base = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(layer.mode, nn.RNN)
        if type(layer).forward is not base.forward:
            return f"{type(layer).__name__} overrides {base.__name__}.forward"
        return None
    return f"{type(layer).__name__} is not a Linear, Conv2d or recurrent layer"


class RecurrentInputs:
    """The calls of a recurrent layer: ``(input sequence, initial state)`` per calibration batch."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, Any]] = []

    def observe_call(self, args: tuple) -> None:
        x = args[0]
        if not isinstance(x, torch.Tensor):
            raise UnsupportedError("layer-by-layer calibration of a recurrent layer fed a PackedSequence",
                                   hint="leave the layer out of the scope (Scope(exclude=[...]))")
        hx = args[1] if len(args) > 1 else None
        self.calls.append((x.detach(), None if hx is None else _detach(hx)))

    @property
    def rows(self) -> int:
        return len(self.calls)


def _detach(hx: Any) -> Any:
    return tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()


def _single_layer(rnn: nn.RNNBase, k: int) -> nn.RNNBase:
    """A one-layer copy of layer ``k`` of ``rnn`` (both directions), sharing nothing with it."""
    kind = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(rnn.mode, nn.RNN)
    kwargs = {"nonlinearity": rnn.nonlinearity} if kind is nn.RNN else {}
    if kind is nn.LSTM:
        kwargs["proj_size"] = rnn.proj_size
    size = rnn.input_size if k == 0 else (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
    one = kind(size, rnn.hidden_size, num_layers=1, bias=rnn.bias, batch_first=rnn.batch_first,
               bidirectional=rnn.bidirectional, **kwargs).to(next(rnn.parameters()).device)
    with torch.no_grad():
        for name in one._flat_weights_names:
            getattr(one, name).copy_(getattr(rnn, name.replace("_l0", f"_l{k}")).detach())
    return one


def recurrent_rows(rnn: nn.RNNBase, inputs: RecurrentInputs):
    """For each layer ``k`` of ``rnn``, bottom up: ``{matrix name: rows}`` of its input matrices
    (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``_reverse`` too). Between two yields the caller may
    edit layer ``k``'s weights in place: layer ``k + 1``'s inputs are computed from the edited layer."""
    directions = 2 if rnn.bidirectional else 1
    time_axis = 1 if rnn.batch_first else 0
    seqs = [x for x, _ in inputs.calls]
    for k in range(rnn.num_layers):
        out_size = rnn.proj_size or rnn.hidden_size
        one = _single_layer(rnn, k)
        rows: dict[str, list[torch.Tensor]] = {}
        outputs = []
        for (_, hx), seq in zip(inputs.calls, seqs):
            state = None if hx is None else _layer_state(hx, k, directions)
            with torch.no_grad():
                out, _ = one(seq, state)
            outputs.append(out)
            h0 = None if hx is None else (hx[0] if isinstance(hx, tuple) else hx)
            for d, suffix in enumerate(["", "_reverse"][:directions]):
                rows.setdefault(f"weight_ih_l{k}{suffix}", []).append(seq.reshape(-1, seq.shape[-1]))
                h = out[..., d * out_size:(d + 1) * out_size]
                first = (torch.zeros_like(h.select(time_axis, 0)) if h0 is None
                         else h0[k * directions + d]).unsqueeze(time_axis)
                n = h.shape[time_axis]  # the state each step starts from: h[t-1] forward, h[t+1] reverse
                if d == 0:
                    prev = torch.cat([first, h.narrow(time_axis, 0, n - 1)], time_axis)
                else:
                    prev = torch.cat([h.narrow(time_axis, 1, n - 1), first], time_axis)
                rows.setdefault(f"weight_hh_l{k}{suffix}", []).append(prev.reshape(-1, out_size))
        yield {name: torch.cat(parts) for name, parts in rows.items()}
        one = _single_layer(rnn, k)  # the layer as the caller left it
        with torch.no_grad():
            seqs = [one(seq, None if hx is None else _layer_state(hx, k, directions))[0]
                    for (_, hx), seq in zip(inputs.calls, seqs)]


def _layer_state(hx: Any, k: int, directions: int) -> Any:
    part = slice(k * directions, (k + 1) * directions)
    return tuple(h[part] for h in hx) if isinstance(hx, tuple) else hx[part]


class _GroupDone(Exception):
    """Raised by a hook once every layer of the observed group has run: the rest of the forward
    pass is not needed."""


@dataclass
class Group:
    """Layers that read the same input, in call order; ``once``: each is called once per forward."""

    names: list[str]
    once: bool


def calibration_inputs(data: Any, batches: int, where: str) -> list[Any]:
    """Up to ``batches`` batches of model inputs from ``data`` (checked: present, finite)."""
    if data is None:
        raise DataError(f"{where} calibrates on data and got none",
                        hint="pass calibration batches (e.g. -d with a few hundred samples, or data=... in Python)")
    out = []
    for inputs in as_data(data).inputs():
        check_finite(inputs, f"{where} calibration")
        out.append(inputs)
        if len(out) >= batches:
            break
    if not out:
        raise DataError(f"{where}: the calibration data is empty (no batch)",
                        hint="pass calibration batches, e.g. a few hundred training samples")
    return out


def _token_mask(inputs: Any) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def call_groups(model: nn.Module, layers: dict[str, nn.Module], inputs: Any) -> tuple[list[Group], list[str]]:
    """Groups of ``layers`` in the order ``model`` calls them on ``inputs``, and the layers not called.

    Consecutive calls reading the same tensor form one group; a layer called more than once per
    forward is a group of its own (observed over the whole forward).
    """
    calls: list[tuple[str, bool]] = []  # (layer, reads the tensor the call before it read)
    counts: dict[str, int] = {}
    last: dict[str, Any] = {"input": None}  # only the latest input is held: all of them would be a
    # whole batch's activations of every layer (the peak of calibration on a deep model)

    def hook(name):
        def fn(_module, args):
            counts[name] = counts.get(name, 0) + 1
            x = args[0] if args else None
            if counts[name] == 1:
                calls.append((name, x is not None and x is last["input"]))
            last["input"] = x
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    last["input"] = None
    groups: list[Group] = []
    for name, same_input in calls:
        single = counts[name] == 1
        if groups and same_input and single and groups[-1].once:
            groups[-1].names.append(name)
        else:
            groups.append(Group([name], single))
    unreached = [n for n in layers if n not in counts]
    return groups, unreached


@torch.no_grad()
def calibrate_layerwise(model: nn.Module, layers: Iterable[tuple[str, nn.Module]], batches: list[Any],
                        make_observer: Callable[[int, torch.device], Observer],
                        compress: Callable[[str, nn.Module, Observer], None] | None, description: str,
                        compress_group: Callable[[dict[str, nn.Module], dict[str, Observer]], None] | None = None,
                        *, offload: Offload = "none", also_hold: Callable[[list[str]], list[nn.Module]] | None = None,
                        replaces_weights: bool = False, log: Callable[[str], None] | None = None) -> list[str]:
    """Observe and compress ``layers`` group by group (see the module docstring); returns the names
    of the layers the calibration data did not reach (left as they are). ``make_observer(features,
    device)`` builds the statistics of one layer (e.g. :class:`Hessian`); a recurrent layer gets a
    :class:`RecurrentInputs` and its ``compress`` goes through :func:`recurrent_rows`.
    ``compress(name, layer, observer)`` is called per layer, or ``compress_group(layers, observers)``
    once per group (methods that choose something shared by the layers reading one input: AWQ's scales).

    ``offload`` (``"none"``, ``"disk"``, ``"auto"``): keep the layers' weights on disk while they
    are not running or being compressed (:mod:`.offload`); ``"auto"`` does so when the weights and
    the calibration's estimated memory exceed what is available (``$MODELPRESS_MEMORY_LIMIT``, the
    cgroup limit, ``MemAvailable``). ``also_hold(group names)`` names modules outside the group that
    the method edits while compressing it (AWQ scales the layer producing the group's input).
    ``replaces_weights``: the method keeps its own packed copy of each compressed layer's weight
    (GPTQ, AWQ), so an offloaded layer comes back without its float weight (a ``meta`` tensor)."""
    layers = dict(layers)
    if not layers:
        raise UnsupportedError(f"{description}: no layer to calibrate", hint="widen the scope")
    device = next(next(iter(layers.values())).parameters()).device
    batches = [to_device(b, device) for b in batches]  # the data go where the model is
    was_training = model.training
    model.eval()
    devices = {n: next(m.parameters()).device for n, m in layers.items()}  # before any goes to disk
    store, compressed = None, set()
    go, why = should_offload(offload, layer_bytes(layers), working_bytes(layers, make_observer, batches))
    try:
        if go:
            store = DiskOffload(model, layers, tempfile.mkdtemp(prefix="modelpress-offload-"))
            (log or _silent)(f"{description}: {store.layers} layers' weights wait on disk during calibration ({why})")
        groups, unreached = call_groups(model, layers, batches[0])
        with progress_bar(description, total=len(groups)) as advance:
            for group in groups:
                advance(0, note=group.names[0])
                observers = {n: RecurrentInputs() if isinstance(layers[n], nn.RNNBase)
                             else make_observer(input_features(layers[n]), devices[n])
                             for n in group.names}
                _observe(model, {n: layers[n] for n in group.names}, observers, batches, group.once)
                held = [layers[n] for n in group.names] + (also_hold(group.names) if also_hold else [])
                with store.held(held) if store is not None else contextlib.nullcontext():
                    if compress_group is not None:
                        compress_group({n: layers[n] for n in group.names}, observers)
                    else:
                        for n in group.names:
                            compress(n, layers[n], observers[n])
                compressed.update(layers[n] for n in group.names)
                del observers
                release_free_memory()  # a group's statistics and copies, freed: glibc would keep them
                advance()
    except BaseException:
        if store is not None:
            with contextlib.suppress(Exception):  # the error that stopped calibration is the one to report
                store.restore()
        raise
    else:
        if store is not None:
            store.restore({m: {"weight"} for m in compressed} if replaces_weights else None)
    finally:
        model.train(was_training)
    return unreached


def _silent(_message: str) -> None:
    pass


def working_bytes(layers: dict[str, nn.Module], make_observer: Callable, batches: list[Any]) -> int:
    """An estimate of what calibration allocates besides the layers' weights: the calibration
    inputs, three of the largest layer's statistics (a group such as q, k, v) and a batch's
    activations (a few tensors of the largest layer's input width per row of the batch)."""
    widest = max((input_features(m) for m in layers.values() if not isinstance(m, nn.RNNBase)), default=1)
    per = getattr(make_observer, "bytes_for", Hessian.bytes_for)
    first = next(iter(batches[0].values())) if isinstance(batches[0], dict) else batches[0]
    if isinstance(first, (tuple, list)):
        first = first[0]
    rows = 0
    if isinstance(first, torch.Tensor):
        rows = first.numel() // (first.shape[-1] if first.is_floating_point() and first.dim() > 1 else 1)
    return tensor_bytes(batches) + 3 * per(widest) + 8 * rows * widest * 4


def _observe(model: nn.Module, layers: dict[str, nn.Module], observers: dict[str, Observer],
             batches: list[Any], stop_early: bool) -> None:
    seen: set[str] = set()
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name, layer):
        def fn(_module, args):
            if isinstance(layer, nn.RNNBase):
                observers[name].observe_call(args)
            else:
                observers[name].observe(layer_rows(layer, args[0], state["mask"]).detach())
            seen.add(name)
            if stop_early and len(seen) == len(layers):
                raise _GroupDone
        return fn

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()]
    try:
        for inputs in batches:
            seen.clear()
            state["mask"] = _token_mask(inputs)
            try:
                call_model(model, inputs)
            except _GroupDone:
                pass
    finally:
        for h in handles:
            h.remove()
