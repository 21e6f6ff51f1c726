"""Non-uniform weight quantization: k-means weight sharing (``quant.kmeans``) and power-of-two
levels (``quant.log2``), stored as a small codebook + uint8 indices.

**Weight sharing** (Han et al., *Deep Compression*, ICLR 2016): the non-zero weights of each
layer are clustered into ``k = 2**bits`` centroids by 1-D k-means and every weight is replaced
by its centroid. Pruned zeros are kept exactly zero and are not clustered (code 0 is reserved
for them), so a pruned layer stays pruned. The paper's defaults are 8 bits for conv layers and
5 bits for fully connected ones (``bits=5, layer_bits={"type:Conv2d": 8}``, the defaults here).
Centroids start from ``init="linear"`` (evenly spaced between the smallest and largest weight,
the paper's best), ``"density"`` (quantiles) or ``"random"`` (Forgy: random weights).

When the caller passes training (``train=TrainConfig(...)`` and data), the *centroids* are
fine-tuned: the quantized layer computes ``weight = codebook[indices]``, so the gradient of
each centroid is the sum of the gradients of the weights that share it (the paper's
centroid update), and the zeros, which are not in the codebook, stay zero.

**Power-of-two levels** (``quant.log2``; Miyashita et al., 2016): ``w -> sign(w) 2**round(log2|w|)``
with a per-layer largest exponent ``round(log2 max|w|)`` and ``2**(bits-1) - 1`` exponents
below and including it per sign; smaller magnitudes become zero. The levels are a fixed
codebook, so the same layers store them (in float32, where every power of two is exact).
Power-of-two levels cost ~12-15 dB SQNR per layer whatever the bits (the grid's ratio is 2),
so the first and last layer stay float by default (``keep_first_last``), as usual for
low-precision quantization.

The result is a model whose selected layers are :class:`CodebookLinear` / :class:`CodebookConv2d`:
``codebook`` (float16 by default), ``indices`` (uint8, the weight's shape) and ``bias``; their
state_dict holds ``table`` (codebook then bias, one tensor: less artifact header) and ``indices``.
To the code around them they look like the layers they replaced: ``weight`` is the decoded weight
in the layer's compute dtype (float32 unless the original layer was another; not the codebook's
storage dtype), so a parent reading ``out_proj.weight`` or a fused fast path computes as before.
Artifacts store the indices with the ``huffman`` encoding (:mod:`modelpress.artifact.huffman`):
the non-zero positions as relative gaps plus their codes, Huffman-coded when that is smaller.
Every verb returns a new model; the input is not modified.

The 1-D k-means is a hand-written Lloyd loop rather than scikit-learn's ``KMeans``: in one
dimension the nearest centroid is a ``searchsorted`` on the midpoints between sorted
centroids, and the update a ``bincount``, which is exact, deterministic and takes about a
millisecond per layer (``KMeans`` would add a dependency and its per-call overhead).

    >>> import torch
    >>> from modelpress import quantize
    >>> from modelpress.quantization.codebook import WeightSharing, CodebookLinear
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> q = quantize(m, WeightSharing(bits=3))
    >>> isinstance(q[0], CodebookLinear), q[0].weight.unique().numel() <= 8, q[0].indices.dtype
    (True, True, torch.uint8)
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..core.config import MethodConfig
from ..core.errors import ConfigError, ScopeError
from ..core.scope import Scope, _normalise, first_and_last
from ..engine import MethodInputs, MethodResult, register_method
from ..nn.layer_kinds import plain_linears
from ..nn.modules import set_module
from ..nn.records import buildable
from .primitives import sqnr

LAYER_TYPES = ("Linear", "Conv2d")
StorageDtype = Literal["float16", "float32"]
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# dtypes a codebook layer may compute in (the original layer's); float32 is not recorded in artifacts
_COMPUTE_DTYPES = {**_TORCH_DTYPES, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- layers --------------------------------------------------------------------------
class _CodebookWeight(nn.Module):
    """Storage shared by :class:`CodebookLinear` and :class:`CodebookConv2d`.

    ``weight = codebook[indices]``, or with ``zero_code``: code 0 is an exact zero that is not
    in the codebook and codes ``1..levels`` are the centroids.
    """

    weight_shape: tuple[int, ...]

    def _init_storage(self, levels: int, zero_code: bool, bias: bool, dtype: str, compute_dtype: str) -> None:
        if not 0 <= levels + int(zero_code) <= 256:
            raise ConfigError(f"a codebook layer holds at most 256 codes (got {levels} levels"
                              f"{' + the zero code' if zero_code else ''})", hint="use bits <= 8")
        if dtype not in _TORCH_DTYPES:
            raise ConfigError(f"codebook dtype must be one of {sorted(_TORCH_DTYPES)} (got {dtype!r})")
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"codebook compute_dtype must be one of {sorted(_COMPUTE_DTYPES)} "
                              f"(got {compute_dtype!r})")
        self.zero_code = zero_code
        self.codebook = nn.Parameter(torch.zeros(levels, dtype=_TORCH_DTYPES[dtype]))
        self.register_buffer("indices", torch.zeros(self.weight_shape, dtype=torch.uint8))
        # The bias is saved in the codebook's dtype (see _save_to_state_dict) but held in the compute
        # dtype, as a parent reading ``layer.bias`` expects (its values are those of the stored dtype).
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0], dtype=_COMPUTE_DTYPES[compute_dtype])) \
            if bias else None
        # An empty, unsaved buffer whose dtype is the compute dtype: model.half() / .to(dtype) cast it.
        self.register_buffer("_compute", torch.empty(0, dtype=_COMPUTE_DTYPES[compute_dtype]), persistent=False)

    @property
    def levels(self) -> int:
        return self.codebook.numel()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of :attr:`weight`: the original layer's, whatever the codebook is stored in."""
        return self._compute.dtype

    def decoded_weight(self) -> torch.Tensor:
        """``codebook[indices]`` in the codebook's storage dtype (differentiable w.r.t. the codebook)."""
        table = self.codebook
        if self.zero_code:
            table = torch.cat([table.new_zeros(1), table])
        return table[self.indices.long()]

    @property
    def weight(self) -> torch.Tensor:
        """The shared weight in :attr:`compute_dtype` (differentiable w.r.t. the codebook while it
        trains, decoded once for inference), for code that reads ``layer.weight``."""
        return self._weight_bias(self.compute_dtype, self.codebook.device)[0]

    def _weight_bias(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Inference decodes once and reuses the float weight until the codebook or the indices
        # change (a training step or a load bumps their version or replaces them): decoding on
        # every call made a shared-weight model slower than the float one at small batches.
        training = torch.is_grad_enabled() and (self.codebook.requires_grad or
                                                (self.bias is not None and self.bias.requires_grad))
        key = (id(self.codebook), self.codebook._version, id(self.indices), self.indices._version,
               None if self.bias is None else (id(self.bias), self.bias._version), dtype, device)
        cached = self.__dict__.get("_decoded")
        if not training and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        weight = self.decoded_weight().to(device=device, dtype=dtype)
        if not training:
            # the bias is cached detached: it lives in the codebook table, not in the state dict, so
            # an exporter's tracer takes it for a constant, which must not require grad
            self.__dict__["_decoded"] = (key, weight, None if bias is None else bias.detach())
        return weight, bias

    def _storage_spec(self) -> dict:
        # Only what differs from the defaults: an artifact's header counts against its size. The
        # codebook's length and dtype are not recorded: loading takes them from the stored tensor.
        spec = {}
        if self.bias is None:
            spec["bias"] = False
        if not self.zero_code:
            spec["zero_code"] = False
        if self.compute_dtype != torch.float32:
            spec["compute_dtype"] = _dtype_name(self.compute_dtype)
        return spec

    # Serialized form: one tensor ``table`` = codebook levels followed by the bias (torch's own
    # quantized modules also save a packed form). Each tensor costs ~65 bytes of safetensors
    # header, as much as a small layer's codebook, and the levels count is ``table`` minus bias.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        parts = [self.codebook] + ([self.bias.to(self.codebook.dtype)] if self.bias is not None else [])
        table = torch.cat(parts) if keep_vars else torch.cat(parts).detach()
        destination[prefix + "table"] = table
        destination[prefix + "indices"] = self.indices if keep_vars else self.indices.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        local = {k: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        table = local.pop(prefix + "table", None)
        if isinstance(table, torch.Tensor) and table.dim() == 1:
            n_bias = self.weight_shape[0] if self.bias is not None else 0
            levels = table.numel() - n_bias
            if levels < 0 or levels + int(self.zero_code) > 256:
                error_msgs.append(f"{prefix}table: {table.numel()} values cannot hold a codebook and "
                                  f"{n_bias} biases")
                return
            with torch.no_grad():  # the codebook's length and dtype come from the file
                device = self.codebook.device
                self.codebook = nn.Parameter(table[:levels].clone().to(device))
                if self.bias is not None:
                    self.bias = nn.Parameter(table[levels:].clone().to(device=device, dtype=self.compute_dtype))
            local[prefix + "codebook"] = self.codebook.detach()
            if self.bias is not None:
                local[prefix + "bias"] = self.bias.detach()
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight_shape)}, levels={self.levels}, zero_code={self.zero_code}, "
                f"dtype={str(self.codebook.dtype).replace('torch.', '')}")


@buildable
class CodebookLinear(_CodebookWeight):
    """``nn.Linear`` whose weight is ``codebook[indices]`` (uint8 indices, shared float levels)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, levels: int = 0,
                 zero_code: bool = True, dtype: str = "float16", compute_dtype: str = "float32"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_storage(levels, zero_code, bias, dtype, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._weight_bias(x.dtype, x.device))

    def spec(self) -> dict:  # recorded in artifacts (see modelpress.nn.records)
        return {"in_features": self.in_features, "out_features": self.out_features, **self._storage_spec()}

    @classmethod
    def from_spec(cls, args: dict) -> "CodebookLinear":
        return cls(**args)


_CONV_DEFAULTS = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"}


@buildable
class CodebookConv2d(_CodebookWeight):
    """``nn.Conv2d`` whose weight is ``codebook[indices]`` (uint8 indices, shared float levels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", levels: int = 0,
                 zero_code: bool = True, dtype: str = "float16", compute_dtype: str = "float32"):
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False,
                        padding_mode, device="meta")  # validates and normalises the geometry
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = ref.kernel_size, ref.stride, ref.dilation
        self.padding, self.padding_mode = ref.padding, padding_mode
        self._reversed_padding_repeated_twice = ref._reversed_padding_repeated_twice
        self.weight_shape = tuple(ref.weight.shape)
        self._init_storage(levels, zero_code, bias, dtype, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weight_bias(x.dtype, x.device)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def spec(self) -> dict:
        geometry = {"stride": list(self.stride), "dilation": list(self.dilation), "groups": self.groups,
                    "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                    "padding_mode": self.padding_mode}
        # Defaults are left out: an artifact's header counts against its size.
        geometry = {k: v for k, v in geometry.items() if _CONV_DEFAULTS[k] != v}
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), **geometry, **self._storage_spec()}

    @classmethod
    def from_spec(cls, args: dict) -> "CodebookConv2d":
        return cls(**args)


def empty_codebook_layer(layer: nn.Module, levels: int, zero_code: bool, dtype: str) -> _CodebookWeight:
    """A codebook layer with ``layer``'s geometry and compute dtype (codebook and indices still zero)."""
    bias = layer.bias is not None
    compute = _dtype_name(layer.weight.dtype)
    if isinstance(layer, nn.Linear):
        return CodebookLinear(layer.in_features, layer.out_features, bias, levels, zero_code, dtype, compute)
    if isinstance(layer, nn.Conv2d):
        return CodebookConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, bias, layer.padding_mode, levels, zero_code, dtype,
                              compute)
    raise ScopeError(f"{type(layer).__name__} cannot hold a codebook", hint="quantize Linear or Conv2d layers")


def codebook_layer(layer: nn.Module, codebook: torch.Tensor, codes: torch.Tensor, zero_code: bool,
                   dtype: str = "float32") -> _CodebookWeight:
    """Build the codebook layer of ``layer`` from centroids and codes (see :func:`kmeans_codebook`)."""
    q = empty_codebook_layer(layer, codebook.numel(), zero_code, dtype)
    with torch.no_grad():
        q.codebook.copy_(codebook)
        q.indices.copy_(codes.reshape(q.weight_shape))
        if layer.bias is not None:
            q.bias.copy_(layer.bias.detach())
    return q.to(layer.weight.device)


def codebook_layers(model: nn.Module) -> list[tuple[str, _CodebookWeight]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _CodebookWeight)]


# -- clustering ----------------------------------------------------------------------
def _init_centroids(x: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    if init == "linear":
        return np.linspace(x.min(), x.max(), k)
    if init == "density":
        return np.quantile(x, (np.arange(k) + 0.5) / k)
    values = np.unique(x)
    return np.sort(np.random.default_rng(seed).choice(values, size=k, replace=False))


def kmeans_1d(x: np.ndarray, k: int, init: str = "linear", iters: int = 50,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on 1-D data: ``(sorted centroids without empty clusters, assignment)``.

        >>> import numpy as np
        >>> from modelpress.quantization.codebook import kmeans_1d
        >>> c, a = kmeans_1d(np.array([0.0, 0.1, 0.9, 1.0, 5.0]), 2)
        >>> c.round(3).tolist(), a.tolist()
        ([0.5, 5.0], [0, 0, 0, 0, 1])
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    k = max(1, min(k, len(np.unique(x))))
    c = _init_centroids(x, k, init, seed)
    for _ in range(iters):
        a = np.searchsorted((c[1:] + c[:-1]) / 2, x)  # nearest centroid, in 1-D
        counts = np.bincount(a, minlength=k)
        sums = np.bincount(a, weights=x, minlength=k)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c))
        if np.array_equal(new, c):
            break
        c = new
    a = np.searchsorted((c[1:] + c[:-1]) / 2, x)
    used = np.flatnonzero(np.bincount(a, minlength=k))
    remap = np.full(k, -1)
    remap[used] = np.arange(len(used))
    sums = np.bincount(a, weights=x, minlength=k)[used]
    return sums / np.bincount(a, minlength=k)[used], remap[a]


def kmeans_codebook(w: torch.Tensor, bits: int, init: str = "linear", keep_zeros: bool = True, iters: int = 50,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Cluster ``w`` into at most ``2**bits`` shared values: ``(codebook, codes uint8, zero_code)``.

    With ``keep_zeros`` and zeros present, the zeros get code 0 (not clustered) and the
    non-zeros codes ``1..k`` (``k <= 255``, so 8 bits give 255 centroids + the zero).
    """
    flat = w.detach().reshape(-1).double().cpu().numpy()
    zero_code = keep_zeros and bool((flat == 0).any())
    k = min(2 ** bits, 255) if zero_code else 2 ** bits
    members = flat != 0 if zero_code else np.ones(flat.shape, bool)
    codes = np.zeros(flat.shape, np.int64)
    if members.any():
        centroids, assign = kmeans_1d(flat[members], k, init, iters, seed)
        codes[members] = assign + int(zero_code)
    else:
        centroids = np.zeros(0)
    return torch.from_numpy(centroids).float(), torch.from_numpy(codes.astype(np.uint8)).reshape(w.shape), zero_code


def log2_codebook(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Power-of-two levels: ``(codebook, codes uint8, zero_code=True)``.

    Exponents ``emax - m + 1 .. emax`` with ``m = 2**(bits-1) - 1`` and ``emax = round(log2 max|w|)``;
    code 0 is zero, codes ``1..m`` the negative levels, ``m+1..2m`` the positive ones. A weight
    takes the exponent nearest to ``log2|w|``; one below ``2**(emin-1)`` becomes zero, and
    zeros (pruned weights) stay zero.

        >>> import torch
        >>> from modelpress.quantization.codebook import log2_codebook
        >>> cb, codes, _ = log2_codebook(torch.tensor([0.3, -0.9, 0.01, 0.0]), bits=3)
        >>> cb.tolist(), (torch.cat([torch.zeros(1), cb])[codes.long()]).tolist()
        ([-1.0, -0.5, -0.25, 0.25, 0.5, 1.0], [0.25, -1.0, 0.0, 0.0])
    """
    m = 2 ** (bits - 1) - 1
    flat = w.detach().reshape(-1).double().cpu()
    amax = float(flat.abs().max()) if flat.numel() else 0.0
    emax = round(math.log2(amax)) if amax > 0 else 0
    emin = emax - m + 1
    exps = torch.arange(emin, emax + 1, dtype=torch.float64)
    pos = torch.pow(2.0, exps)
    codebook = torch.cat([-pos.flip(0), pos]).float()
    mag = flat.abs()
    e = torch.round(torch.log2(mag.clamp_min(1e-300))).clamp(emin, emax)
    slot = (e - emin).long()  # 0..m-1 from smallest to largest magnitude
    zero = (mag < 2.0 ** (emin - 1)) | (flat == 0)
    codes = torch.where(flat > 0, m + 1 + slot, m - slot)
    codes = torch.where(zero, torch.zeros_like(codes), codes)
    return codebook, codes.to(torch.uint8).reshape(w.shape), True


# -- configs ---------------------------------------------------------------------------
class _CodebookConfig(MethodConfig):
    """Fields shared by the codebook quantizers (not registered itself)."""

    bits: int = Field(5, ge=1, le=8, description="index bits per weight (2**bits levels), unless layer_bits says")
    layer_bits: dict[str, int] = Field(default_factory=dict,
                                       description="bits per layer: keys are layer names, 're:' patterns or "
                                                   "'type:' names; a name beats a pattern beats a type")
    scope: Scope = Scope()
    storage_dtype: StorageDtype = Field("float16", description="dtype of the stored codebook and bias")

    min_bits: ClassVar[int] = 1

    @field_validator("layer_bits")
    @classmethod
    def _layer_bits(cls, v):
        lo = cls.min_bits
        for key, b in v.items():
            _normalise(key)
            if not lo <= b <= 8:
                raise ValueError(f"layer {key!r}: bits must be in {lo}..8 (got {b})")
        return v

    def bits_for(self, name: str, module: nn.Module) -> int:
        """The bits of layer ``name``: exact name, else first matching 're:', else 'type:', else ``bits``."""
        for kind in ("name", "re:", "type:"):
            for key, b in self.layer_bits.items():
                is_kind = key.startswith(kind) if kind != "name" else not key.startswith(("re:", "type:"))
                if is_kind and Scope._match(key, name, module):
                    return b
        return self.bits


class WeightSharing(_CodebookConfig):
    """k-means weight sharing (Deep Compression): ``2**bits`` shared values per layer.

    Defaults follow the paper: 5 bits for fully connected layers, 8 for convolutions.
    """

    layer_bits: dict[str, int] = Field(default_factory=lambda: {"type:Conv2d": 8},
                                       description="bits per layer: keys are layer names, 're:' patterns or "
                                                   "'type:' names; a name beats a pattern beats a type")
    keep_zeros: bool = Field(True, description="pruned zeros stay exactly zero and are not clustered")
    init: Literal["linear", "density", "random"] = Field("linear", description="centroid initialisation")
    iters: int = Field(50, ge=1, le=1000, description="most Lloyd iterations per layer")
    seed: int = Field(0, description="seed of init='random'")


class PowerOfTwo(_CodebookConfig):
    """Logarithmic quantization: ``sign(w) 2**round(log2|w|)`` with ``2**(bits-1) - 1`` exponents per sign."""

    bits: int = Field(5, ge=2, le=8, description="code bits: 1 sign + exponent (zero has its own code)")
    storage_dtype: StorageDtype = Field("float32", description="dtype of the stored codebook and bias "
                                                               "(float32 keeps every power of two exact)")
    keep_first_last: bool = Field(True, description="leave the first and last layer in float (power-of-two "
                                                    "levels cost ~13 dB SQNR per layer)")
    min_bits: ClassVar[int] = 2


# -- methods ---------------------------------------------------------------------------
def _resolve_layers(model: nn.Module, cfg: _CodebookConfig) -> list[tuple[str, nn.Module]]:
    keep = first_and_last(model, LAYER_TYPES) if getattr(cfg, "keep_first_last", False) else []
    layers = plain_linears(model, cfg.scope.resolve(model, LAYER_TYPES, default_exclude=keep))
    for key in cfg.layer_bits:  # a 'type:' rule may match nothing (e.g. the conv default on an MLP)
        if not key.startswith("type:") and not any(Scope._match(key, n, m) for n, m in layers):
            raise ScopeError(f"layer_bits names {key!r}, which matches no selected layer",
                             hint=f"selected layers: {', '.join(n for n, _ in layers)}")
    return layers


def _replace(model: nn.Module, cfg: _CodebookConfig, cluster) -> dict:
    """Replace every selected layer by its codebook layer (float32 while training); the per-layer report."""
    report = {}
    encodings = dict(getattr(model, "modelpress_encodings", {}))
    for name, layer in _resolve_layers(model, cfg):
        bits = cfg.bits_for(name, layer)
        codebook, codes, zero_code = cluster(layer.weight, bits)
        q = codebook_layer(layer, codebook, codes, zero_code)
        report[name] = {"bits": bits, "levels": q.levels, "sqnr_db": round(sqnr(layer.weight, q.weight), 2)}
        set_module(model, name, q)
        encodings[f"{name}.indices"] = "huffman"  # smallest of plain packing and Huffman, sparse or dense
    model.modelpress_encodings = encodings
    return report


def _finalize(model: nn.Module, dtype: str) -> nn.Module:
    """Cast codebooks to the storage dtype and round biases to it (what the artifact holds); biases
    stay in the compute dtype."""
    for _, q in codebook_layers(model):
        q.codebook.data = q.codebook.data.to(_TORCH_DTYPES[dtype])
        if q.bias is not None:
            q.bias.data = q.bias.data.to(_TORCH_DTYPES[dtype]).to(q.compute_dtype)
    return model


def _finish(model: nn.Module, cfg: _CodebookConfig, inputs: MethodInputs, report: dict,
            description: str) -> MethodResult:
    # centroids train in float32, before the codebooks are cast to their storage dtype
    if inputs.can_train:
        inputs.fit(model, description)
    return MethodResult(_finalize(model, cfg.storage_dtype), {"layers": report}, trained=inputs.can_train)


@register_method("quant.kmeans", WeightSharing, layer_types=LAYER_TYPES)
def weight_sharing(model: nn.Module, cfg: WeightSharing, inputs: MethodInputs) -> MethodResult:
    """k-means weight sharing (Deep Compression), with centroid fine-tuning when given training."""
    report = _replace(model, cfg, lambda w, bits: kmeans_codebook(w, bits, cfg.init, cfg.keep_zeros, cfg.iters,
                                                                   cfg.seed))
    return _finish(model, cfg, inputs, report, "centroid fine-tune")


@register_method("quant.log2", PowerOfTwo, layer_types=LAYER_TYPES)
def power_of_two(model: nn.Module, cfg: PowerOfTwo, inputs: MethodInputs) -> MethodResult:
    """Power-of-two (logarithmic) weight levels; given training, fine-tunes the rest (levels stay fixed)."""
    report = _replace(model, cfg, lambda w, bits: log2_codebook(w, bits))
    for _, q in codebook_layers(model):
        q.codebook.requires_grad_(False)  # the levels are powers of two by definition
    return _finish(model, cfg, inputs, report, "fine-tune (fixed power-of-two levels)")
