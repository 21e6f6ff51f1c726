"""One data adapter for every method: ``Data(source, transform=fn)``.

Accepted sources (the adapter never copies the data, it only iterates it):

* a ``torch.utils.data.DataLoader`` (used as is),
* a ``torch.utils.data.Dataset`` (wrapped in a DataLoader with ``batch_size``),
* a list/tuple of tensors (each one a batch of inputs) or of ``(inputs, target)`` batches,
* a single tensor (split into batches of ``batch_size``),
* a Hugging Face ``datasets.Dataset`` or anything indexable that yields dicts.

The batch convention used across modelpress:

* ``tensor``                 -> inputs only (unlabelled, e.g. calibration)
* ``(inputs, target)``       -> supervised batch
* ``dict``                   -> keyword inputs (``input_ids``, ``attention_mask`` ...);
  an optional ``"labels"`` key is the target.

Example::

    >>> import torch
    >>> from modelpress.core.data import Data
    >>> d = Data(torch.randn(10, 4), batch_size=4)
    >>> [x.shape[0] for x in d.inputs()]
    [4, 4, 2]
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import DataError

Batch = Any


def split_batch(batch: Batch) -> tuple[Any, torch.Tensor | None]:
    """Split a batch into ``(inputs, target)``; ``target`` is None for unlabelled batches."""
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch.get("labels")
    if isinstance(batch, (list, tuple)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise DataError(
            f"a batch is a tuple of {len(batch)} items; expected (inputs,) or (inputs, target)",
            hint="wrap your data with Data(..., transform=fn) returning (inputs, target)",
        )
    return batch, None


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or dicts / lists / tuples of them, Hugging Face
    outputs included); anything else counts 0."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def args_and_kwargs(inputs: Any) -> tuple[tuple, dict]:
    """Inputs in the batch convention as the ``(args, kwargs)`` of a call (a dict: keyword arguments)."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return (tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)), {}


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on inputs in the batch convention (dict -> keyword arguments)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: a tensor, ``.logits`` (Hugging Face outputs), the first
    element of a tuple/list, or ``.last_hidden_state``."""
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(getattr(out, "last_hidden_state", None), torch.Tensor):
        return out.last_hidden_state
    raise DataError(f"cannot take a tensor from a model output of type {type(out).__name__}",
                    hint="wrap the model so it returns a tensor (logits or embeddings)")


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, dict):
        return int(next(iter(inputs.values())).shape[0])
    if isinstance(inputs, (list, tuple)):
        return batch_size_of(inputs[0])
    return int(inputs.shape[0])


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def slice_inputs(inputs: Any, n: int, start: int = 0) -> Any:
    """``n`` samples of a batch of inputs (any convention), from sample ``start`` (default: the first)."""
    if isinstance(inputs, dict):
        return {k: v[start:start + n] for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(slice_inputs(v, n, start) for v in inputs)
    return inputs[start:start + n]


def check_finite(inputs: Any, where: str) -> None:
    """Raise a DataError when a floating tensor in ``inputs`` holds NaN or Inf."""
    tensors = inputs.values() if isinstance(inputs, dict) else (
        inputs if isinstance(inputs, (list, tuple)) else [inputs])
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"{where}: the data contains NaN or Inf values",
                            hint="clean or normalise the data before compressing")


def _rng_neutral(fn):
    """Run a pre-flight check without moving torch's global random state: reading a shuffling
    DataLoader draws its seed from it, and a check must not change what the run then computes."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)
    return wrapper


@_rng_neutral
def check_finite_data(data: Any, where: str) -> None:
    """One pass over ``data`` raising a DataError at the first batch holding NaN or Inf (in any
    floating-point tensor of it: inputs or targets), naming the batch. Used before a run: a NaN in the
    training data would otherwise turn every weight into NaN without a word."""
    for i, batch in enumerate(as_data(data, batch_size=256)):
        check_finite(list(_tensors(batch)), f"{where}, batch {i}")  # any batch structure (pairs, dicts ...)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def check_finite_params(model: nn.Module, where: str) -> None:
    """Raise a DataError naming the first parameter or buffer holding NaN or Inf.

    Compressing such a model silently produces garbage (NaN compares False with every
    threshold), so every entry point checks first.
    """
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise DataError(f"{where}: {kind} {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}",
                                hint="the model is broken (diverged training?); load a healthy checkpoint")


def _shape_of(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {_shape_of(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (list, tuple)):
        return "(" + ", ".join(_shape_of(v) for v in inputs) + ")"
    return type(inputs).__name__


@_rng_neutral
def check_model_accepts(model: nn.Module, inputs: Any, where: str) -> None:
    """Run ``model`` once on (a slice of) ``inputs``; a failure becomes one DataError line
    naming the input shape, instead of a traceback from deep inside a method or training loop.
    The model's training flag is restored and no gradient is recorded."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise DataError(f"{where}: {type(model).__name__} cannot run on inputs of shape {_shape_of(inputs)} "
                        f"({type(exc).__name__}: {first})",
                        hint="the data does not fit the model's input: check the dataset, its transform, "
                             "or the model's first layer") from exc
    finally:
        model.train(was_training)


@_rng_neutral
def first_inputs_if_reusable(data: Any) -> Any | None:
    """One sample of the first batch of ``data`` when reading it does not consume it (a list,
    tensor, Dataset or DataLoader, not a one-shot iterator); else None."""
    if data is None:
        return None
    adapter = data if isinstance(data, Data) else Data(data)
    src = adapter.source
    if isinstance(src, Iterator):  # generators and other one-shot iterators
        return None
    try:
        return slice_inputs(adapter.first_inputs(), 1)
    except (StopIteration, DataError):
        return None


@dataclass
class Data:
    """Adapter over any iterable of batches. See the module docstring for accepted sources.

    ``transform`` maps each raw batch (or each dataset item, for a Dataset source) to the
    batch convention. ``limit`` caps the number of batches yielded per pass (e.g. for
    calibration on a subset).
    """

    source: Any
    transform: Callable[[Any], Any] | None = None
    batch_size: int = 64
    shuffle: bool = False
    limit: int | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.source, Data):  # Data(Data(...)) keeps the inner adapter
            inner = self.source
            self.source, self.transform = inner.source, self.transform or inner.transform
        if self.source is None:
            raise DataError("no data was given", hint="pass a DataLoader, a Dataset or a list of batches")
        if self.batch_size < 1:
            raise DataError(f"Data.batch_size must be >= 1 (got {self.batch_size})")

    def for_training(self, train: Any) -> "Data":
        """This data batched for training with ``train`` (a ``TrainConfig``): ``train.batch_size``
        per batch, shuffled. Sources that carry their own batching (a ``DataLoader``, a list of
        batches) are iterated as they are."""
        return dataclasses.replace(self, batch_size=train.batch_size, shuffle=True)

    # -- iteration -----------------------------------------------------------------
    def _loader(self) -> Iterable:
        src = self.source
        if isinstance(src, DataLoader):
            return src
        if isinstance(src, torch.Tensor):
            return src.split(self.batch_size)
        if isinstance(src, Dataset) or (hasattr(src, "__getitem__") and hasattr(src, "__len__")
                                        and not isinstance(src, (list, tuple))):
            gen = torch.Generator().manual_seed(self.seed)
            # a dataset may say how its items form a batch (e.g. token rows cut to the batch's longest)
            collate = getattr(src, "collate", None)
            if self.transform is not None:
                transform, stack = self.transform, collate or torch.utils.data.default_collate
                collate = lambda items: stack([transform(i) for i in items])  # noqa: E731
            return DataLoader(src, batch_size=self.batch_size, shuffle=self.shuffle, generator=gen,
                              collate_fn=collate)
        if isinstance(src, (list, tuple)) or hasattr(src, "__iter__"):
            return src
        raise DataError(f"cannot iterate data of type {type(src).__name__}",
                        hint="pass a DataLoader, a Dataset, a tensor or a list of batches")

    def __iter__(self) -> Iterator[Batch]:
        loader = self._loader()
        per_item_transform = isinstance(self.source, Dataset) or (
            not isinstance(self.source, (DataLoader, torch.Tensor, list, tuple))
            and hasattr(self.source, "__getitem__"))
        it = iter(loader)
        if self.limit is not None:
            it = itertools.islice(it, self.limit)
        empty = True
        for batch in it:
            empty = False
            if self.transform is not None and not per_item_transform:
                batch = self.transform(batch)
            yield batch
        if empty:
            raise DataError("the data is empty (no batch was produced)",
                            hint="check the dataset path and the split / limit you asked for")

    def inputs(self) -> Iterator[Any]:
        """Iterate only the model inputs of each batch."""
        for batch in self:
            yield split_batch(batch)[0]

    def first_inputs(self) -> Any:
        """The inputs of the first batch (used as example input for tracing/analysis)."""
        return next(self.inputs())

    def __len__(self) -> int:
        src = self.source
        if isinstance(src, DataLoader):
            n = len(src)
        elif isinstance(src, torch.Tensor):
            n = math.ceil(src.shape[0] / self.batch_size)
        elif isinstance(src, (list, tuple)):
            n = len(src)
        elif hasattr(src, "__len__"):
            n = math.ceil(len(src) / self.batch_size)
        else:
            raise TypeError("length unknown")
        return min(n, self.limit) if self.limit is not None else n


def as_data(data: Any, **kwargs) -> Data | None:
    """Wrap anything accepted by :class:`Data` (None stays None)."""
    if data is None or isinstance(data, Data):
        return data
    return Data(data, **kwargs)
