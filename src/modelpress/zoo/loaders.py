"""Readers for datasets the user already has on disk: MNIST idx files, CIFAR-10 python
batches and image folders. Nothing here downloads anything.

Readers return plain numpy arrays (images ``uint8`` or ``float32`` in [0, 1], labels
``int64``); :mod:`modelpress.zoo.datasets` normalises them and wraps them as datasets.
Every problem with the files raises :class:`~modelpress.core.errors.DataError` naming
the path.

Example::

    >>> from modelpress.zoo.loaders import stratified_split
    >>> import numpy as np
    >>> train, test = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1]), 0.8, seed=0)
    >>> len(train), len(test)
    (7, 2)
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from ..core.errors import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def stratified_split(labels: np.ndarray, train_fraction: float = 0.8,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into ``(train_indices, test_indices)``; same seed, same split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = int(round(train_fraction * len(idx)))
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    # a final shuffle so consumers that do not shuffle still see mixed classes
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _check_dir(root: str | Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{what}: directory {root} does not exist",
                        hint="point the dataset spec at the folder holding the files (no download is done)")
    return root


# -- MNIST idx ----------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (plain or ``.gz``) into an array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip raises these on corrupt archives
        raise DataError(f"cannot read idx file {path}: {exc}", hint="re-extract or re-copy the file") from exc
    if len(raw) < 4:
        raise DataError(f"idx file {path} is truncated ({len(raw)} bytes, no header)",
                        hint="the file is incomplete; copy it again")
    zero1, zero2, code, ndim = raw[:4]
    if zero1 != 0 or zero2 != 0 or code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"idx file {path} has a wrong magic number {raw[:4].hex()}",
                        hint="expected an MNIST-style idx file (magic 0x0000080N)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file {path} is truncated inside its header",
                        hint="the file is incomplete; copy it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"idx file {path} holds {len(raw) - header} data bytes, its header "
                        f"declares shape {shape} ({expected} bytes)",
                        hint="the file is truncated or corrupt; copy it again")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST file {root / stem}[.gz] is missing",
                    hint=f"the folder needs {', '.join(MNIST_FILES.values())} (optionally .gz)")


def load_mnist_idx(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from the four MNIST idx files in ``root``.

    Images are ``uint8`` of shape ``(N, H, W)``; labels ``int64`` of shape ``(N,)``.
    Works for Fashion-MNIST / KMNIST too (same file names).
    """
    root = _check_dir(root, "mnist-idx")
    arrays = {}
    for key, stem in MNIST_FILES.items():
        path = _find_file(root, stem)
        arr = read_idx(path)
        want_ndim = 3 if key.endswith("images") else 1
        if arr.ndim != want_ndim:
            raise DataError(f"idx file {path} has {arr.ndim} dimensions, expected {want_ndim}",
                            hint="are image and label files swapped?")
        arrays[key] = arr
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"mnist-idx {root}: {split} split has {n_img} images but {n_lab} labels",
                            hint="the image and label files come from different datasets or are truncated")
    return (arrays["train_images"].astype(np.uint8), arrays["train_labels"].astype(np.int64),
            arrays["test_images"].astype(np.uint8), arrays["test_labels"].astype(np.int64))


# -- CIFAR-10 python batches --------------------------------------------------------------
class SafeUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    A pickle may name any importable callable (``os.system`` ...) and the standard
    unpickler calls it; here every global outside this allow-list is refused before it
    is imported, so a malicious batch file fails instead of running code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")
        return super().find_class(module, name)


def safe_pickle_load(path: str | Path):
    """Load a pickle with :class:`SafeUnpickler`; any failure is a DataError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official CIFAR files were pickled by Python 2
            return SafeUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}", hint="check the path and permissions") from exc
    except Exception as exc:  # noqa: BLE001 - every unpickling failure means an untrusted/corrupt file
        raise DataError(f"{path} is not a plain CIFAR batch pickle: {exc}",
                        hint="only pickles of dicts, lists and numpy arrays are accepted") from exc


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch {path} is missing",
                        hint="the folder needs data_batch_1..5 and test_batch (cifar-10-batches-py)")
    obj = safe_pickle_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-10 batch {path} holds a {type(obj).__name__}, expected a dict")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise DataError(f"CIFAR-10 batch {path} lacks the 'data' or 'labels' entry",
                        hint="is this the python version of CIFAR-10 (not CIFAR-100)?")
    data, labels = np.asarray(obj["data"]), np.asarray(obj["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch {path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"CIFAR-10 batch {path}: {len(data)} images but labels of shape {labels.shape}",
                        hint="the batch file is corrupt")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from CIFAR-10 python batches in ``root``
    (or its ``cifar-10-batches-py`` subfolder). Images ``uint8 (N, 3, 32, 32)``."""
    root = _check_dir(root, "cifar10")
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    parts = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(root / "test_batch")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            x_test, y_test)


# -- image folders ------------------------------------------------------------------------
def _list_classes(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[sub.name] = files
    if not classes:
        raise DataError(f"imagefolder {folder} has no <class>/ subfolders with images",
                        hint=f"expected {folder}/<class>/*.png (suffixes {sorted(IMAGE_SUFFIXES)})")
    return classes


def _read_images(files: list[Path], size: int, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), 1 if mode == "L" else 3, size, size), dtype=np.float32)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert(mode).resize((size, size), Image.BILINEAR)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path}: {exc}", hint="remove or replace the file") from exc
        arr = np.asarray(img, dtype=np.float32) / 255.0
        out[i] = arr[None] if mode == "L" else arr.transpose(2, 0, 1)
    return out


def load_imagefolder(root: str | Path, size: int = 28, channels: int | None = None,
                     seed: int = 0, train_fraction: float = 0.8):
    """``(x_train, y_train, x_test, y_test, classes)`` from an image folder.

    Layouts: ``root/train/<class>/*`` + ``root/test/<class>/*``, or ``root/<class>/*``
    (split ``train_fraction`` per class, seeded). Images become ``float32`` in [0, 1],
    shape ``(N, channels, size, size)``; ``channels`` defaults to the first image's
    (1 for grayscale, 3 otherwise). Class indices follow sorted folder names.
    """
    from PIL import Image

    root = _check_dir(root, "imagefolder")
    if channels not in (None, 1, 3):
        raise DataError(f"imagefolder: channels must be 1 or 3 (got {channels})")
    if size < 1:
        raise DataError(f"imagefolder: size must be >= 1 (got {size})")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _list_classes(root / "train"), _list_classes(root / "test")
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise DataError(f"imagefolder {root}: test classes {unknown} have no training images")
        classes = list(train)
        train_items = [(f, classes.index(c)) for c, fs in train.items() for f in fs]
        test_items = [(f, classes.index(c)) for c, fs in test.items() for f in fs]
    else:
        found = _list_classes(root)
        classes = list(found)
        items = [(f, k) for k, c in enumerate(classes) for f in found[c]]
        tr, te = stratified_split(np.array([k for _, k in items]), train_fraction, seed)
        train_items, test_items = [items[i] for i in tr], [items[i] for i in te]
    if channels is None:
        with Image.open(train_items[0][0]) as first:
            channels = 1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    mode = "L" if channels == 1 else "RGB"

    def read(items):
        x = _read_images([f for f, _ in items], size, mode)
        return x, np.array([k for _, k in items], dtype=np.int64)

    return (*read(train_items), *read(test_items), classes)


# -- CSV tables ----------------------------------------------------------------------------
def load_csv(path: str | Path, label: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A CSV file of numeric features and one class column: ``(features float32 [n, f],
    label indices int64 [n], class names)``. The class column is ``label`` (by header name),
    else the one named ``label``/``target``/``class``, else the last; its values may be any
    strings or numbers (classes are their sorted distinct values). The first row is a header
    when it is not all numbers."""
    import csv

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"csv: file {path} does not exist", hint="point the dataset spec at a .csv file")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"csv: cannot read {path}: {exc}") from None
    if not rows:
        raise DataError(f"csv: {path} is empty")

    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    header = rows[0] if not all(numeric(c) for c in rows[0]) else None
    body = rows[1:] if header else rows
    width = len(rows[0])
    if width < 2 or len(body) < 2:
        raise DataError(f"csv: {path} needs at least 2 columns and 2 data rows (found {width} x {len(body)})")
    names = [h.strip() for h in header] if header else [str(i) for i in range(width)]
    if label is not None:
        if label not in names:
            raise DataError(f"csv: {path} has no column {label!r}", hint=f"columns: {', '.join(names)}")
        col = names.index(label)
    else:
        col = next((names.index(n) for n in ("label", "target", "class") if n in names), width - 1)
    features, labels = [], []
    for lineno, row in enumerate(body, 2 if header else 1):
        if len(row) != width:
            raise DataError(f"csv: {path} line {lineno} has {len(row)} fields, expected {width}")
        try:
            features.append([float(c) for i, c in enumerate(row) if i != col])
        except ValueError:
            raise DataError(f"csv: {path} line {lineno}: a feature is not a number",
                            hint=f"every column but the class column ({names[col]!r}) must be numeric") from None
        labels.append(row[col].strip())
    x = np.asarray(features, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"csv: {path} holds NaN or infinite features", hint="clean the file first")
    as_numbers = all(numeric(v) for v in labels)
    classes = sorted(set(labels), key=(lambda v: float(v)) if as_numbers else None)
    index = {c: i for i, c in enumerate(classes)}
    return x, np.asarray([index[v] for v in labels], dtype=np.int64), classes
