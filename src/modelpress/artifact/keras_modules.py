"""Small PyTorch modules that stand for Keras operations with no one ``torch.nn`` equivalent.

Each does one tensor operation in ``forward`` (no control flow), so ``torch.fx`` traces through
it and modelpress's channel tracking (:mod:`modelpress.graph.channels`) sees the plain op
(``permute``, ``mean``, ``add``, ``cat`` ...). Used by :mod:`.keras_layers`.
"""
from __future__ import annotations

import operator
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn


class Permute(nn.Module):
    """``x.permute(*dims)``: Keras's channels-last tensors to channels-first and back."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x):
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class Reshape(nn.Module):
    """Keras ``Reshape``: every dim but the batch to ``shape`` (one entry may be -1)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Reduce(nn.Module):
    """Mean or max over ``dims`` (Keras's global pooling)."""

    def __init__(self, kind: str, dims: tuple[int, ...], keepdim: bool = False):
        super().__init__()
        self.kind, self.dims, self.keepdim = kind, tuple(dims), keepdim

    def forward(self, x):
        if self.kind == "max":
            return torch.amax(x, dim=self.dims, keepdim=self.keepdim)
        return torch.mean(x, dim=self.dims, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"{self.kind}, dims={self.dims}, keepdim={self.keepdim}"


_MERGES = {"add": operator.add, "subtract": operator.sub, "multiply": operator.mul,
           "maximum": torch.maximum, "minimum": torch.minimum}


class Merge(nn.Module):
    """Keras's ``Add``, ``Subtract``, ``Multiply``, ``Maximum``, ``Minimum`` and ``Average``
    of several tensors (broadcasting like Keras)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, *xs):
        if self.kind == "average":
            return reduce(operator.add, xs) / len(xs)
        return reduce(_MERGES[self.kind], xs)

    def extra_repr(self) -> str:
        return self.kind


class Concat(nn.Module):
    """``torch.cat(xs, dim)`` (Keras ``Concatenate``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, *xs):
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Affine(nn.Module):
    """``x * scale + offset`` (Keras ``Rescaling`` and ``Normalization``), scalars or buffers
    that broadcast against the input."""

    def __init__(self, scale, offset):
        super().__init__()
        for name, value in (("scale", scale), ("offset", offset)):
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, float(value))

    def forward(self, x):
        return x * self.scale + self.offset


class PadPool(nn.Module):
    """Pooling with Keras's ``padding="same"`` where the padding is uneven (the extra row or
    column at the end, as TensorFlow pads). Padded positions never win a max and are left out of
    an average, as in TensorFlow: ``divisor`` (window size over real positions per output, for the
    input size the model was built for) corrects the zero-padded average."""

    def __init__(self, kind: str, kernel: tuple[int, ...], stride: tuple[int, ...], pads: tuple[int, ...],
                 divisor: torch.Tensor | None = None):
        super().__init__()
        self.kind, self.kernel, self.stride, self.pads = kind, tuple(kernel), tuple(stride), tuple(pads)
        if divisor is not None:
            self.register_buffer("divisor", divisor, persistent=False)

    def forward(self, x):
        pool = {("max", 1): F.max_pool1d, ("max", 2): F.max_pool2d,
                ("avg", 1): F.avg_pool1d, ("avg", 2): F.avg_pool2d}[(self.kind, len(self.kernel))]
        if self.kind == "max":
            return pool(F.pad(x, self.pads, value=float("-inf")), self.kernel, self.stride)
        return pool(F.pad(x, self.pads), self.kernel, self.stride) * self.divisor

    def extra_repr(self) -> str:
        return f"{self.kind}, kernel={self.kernel}, stride={self.stride}, pads={self.pads}"


class Crop(nn.Module):
    """Drop ``(begin, end)`` positions of each spatial dim of a channels-first tensor (a transposed
    conv's uneven ``"same"`` padding)."""

    def __init__(self, crops: tuple[tuple[int, int], ...]):
        super().__init__()
        self.crops = tuple(tuple(c) for c in crops)

    def forward(self, x):
        for i, (begin, end) in enumerate(self.crops):
            x = x.narrow(2 + i, begin, x.shape[2 + i] - begin - end)
        return x

    def extra_repr(self) -> str:
        return f"crops={self.crops}"
