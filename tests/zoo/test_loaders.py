"""On-disk readers: MNIST idx, CIFAR-10 batches (safe unpickling), image folders."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from modelpress.core.errors import DataError
from modelpress.zoo.datasets import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, load_dataset
from modelpress.zoo.loaders import read_idx, safe_pickle_load


# -- MNIST idx -------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=6, n_test=4, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(arr))
        else:
            (folder / name).write_bytes(idx_bytes(arr))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    bundle = load_dataset(f"mnist-idx:{tmp_path / 'mnist'}")
    x, y = bundle.train.tensors
    assert x.shape == (6, 1, 28, 28) and len(bundle.test) == 4
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    expected = (arrays["t10k-images-idx3-ubyte"] / 255.0 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(bundle.test.tensors[0][:, 0], torch.as_tensor(expected, dtype=torch.float32), atol=1e-6)
    assert bundle.num_classes == 10  # MNIST-style data: 10 classes even if a tiny file lacks some


def test_mnist_idx_root_argument(tmp_path):
    write_mnist(tmp_path)
    assert len(load_dataset("mnist-idx", root=str(tmp_path)).train) == 6


def test_idx_truncated_data(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        load_dataset(f"mnist-idx:{tmp_path}")
    assert err.value.hint


def test_idx_truncated_header_and_bad_magic(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="header"):
        read_idx(short)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x89PNG" + bytes(100))
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="truncated"):
        read_idx(empty)


def test_idx_corrupt_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match="t10k-labels"):
        load_dataset(f"mnist-idx:{tmp_path}")


def test_idx_count_mismatch_and_missing_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="6 images but 5 labels"):
        load_dataset(f"mnist-idx:{tmp_path}")
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset(f"mnist-idx:{tmp_path}")


# -- CIFAR-10 -------------------------------------------------------------------------------
def write_cifar(folder, per_batch=2, n_test=3, protocol=pickle.HIGHEST_PROTOCOL):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = batch
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_roundtrip(tmp_path, protocol):
    batches = write_cifar(tmp_path, protocol=protocol)
    bundle = load_dataset(f"cifar10:{tmp_path}")
    x, y = bundle.train.tensors
    assert x.shape == (10, 3, 32, 32) and bundle.input_shape == (3, 32, 32)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert bundle.test.tensors[0].shape == (3, 3, 32, 32)
    # a row is 1024 red, 1024 green, 1024 blue values: check one pixel per channel
    row = batches["data_batch_1"][b"data"][1]
    for c in range(3):
        want = (row[c * 1024 + 33] / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert x[1, c, 1, 1].item() == pytest.approx(want, abs=1e-5)
    assert bundle.meta["classes"][0] == "airplane"


def test_cifar10_subfolder_and_missing_batch(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    assert len(load_dataset("cifar10", root=str(tmp_path)).test) == 3
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_dataset(f"cifar10:{tmp_path}")


class RunsShell:
    """Unpickling this object calls os.system with a command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch /tmp/modelpress_eval_marker')",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": RunsShell(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match="data_batch_1") as err:
        load_dataset(f"cifar10:{tmp_path}")
    assert "system" in str(err.value)
    assert not marker.exists()


def test_safe_unpickler_refuses_builtins(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([RunsEval()]))
    with pytest.raises(DataError, match="eval"):
        safe_pickle_load(path)
    assert not os.path.exists("/tmp/modelpress_eval_marker")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": np.arange(3), "b": [1, 2.5, "x"], "c": np.int64(4)}))
    loaded = safe_pickle_load(plain)
    assert loaded["a"].tolist() == [0, 1, 2] and loaded["b"] == [1, 2.5, "x"] and loaded["c"] == 4


def test_cifar_wrong_content(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="3072"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset(f"cifar10:{tmp_path}")


# -- image folders ----------------------------------------------------------------------------
def save_image(path, value, mode="L", size=(10, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, color).save(path)


def test_imagefolder_train_test_layout(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for cls, value in (("cat", 50), ("dog", 200)):
            for i in range(n):
                save_image(tmp_path / split / cls / f"{i}.png", value)
    bundle = load_dataset(f"imagefolder:{tmp_path}")
    x, y = bundle.train.tensors
    assert x.shape == (6, 1, 28, 28) and bundle.test.tensors[0].shape == (2, 1, 28, 28)
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert bundle.meta["classes"] == ["cat", "dog"] and bundle.num_classes == 2
    # constant images: all cat pixels equal, and cat < dog after normalisation
    cat, dog = x[y == 0], x[y == 1]
    assert torch.allclose(cat, cat.flatten()[0].expand_as(cat))
    assert cat.max() < dog.min()
    assert bundle.meta["mean"][0] == pytest.approx((50 + 200) / 2 / 255, abs=1e-4)


def test_imagefolder_flat_layout_and_options(tmp_path):
    for cls, value in (("a", 10), ("b", 120), ("c", 240)):
        for i in range(5):
            save_image(tmp_path / cls / f"{i}.jpg", value, mode="RGB")
    bundle = load_dataset(f"imagefolder:{tmp_path}?size=16")
    assert bundle.train.tensors[0].shape == (12, 3, 16, 16)  # 4 of 5 per class, RGB detected
    assert torch.bincount(bundle.test.tensors[1]).tolist() == [1, 1, 1]
    gray = load_dataset(f"imagefolder:{tmp_path}", size=8, channels=1)
    assert gray.train.tensors[0].shape == (12, 1, 8, 8)
    again = load_dataset(f"imagefolder:{tmp_path}?size=16")
    assert torch.equal(bundle.test.tensors[0], again.test.tensors[0])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="no <class>"):
        load_dataset(f"imagefolder:{tmp_path}")
    save_image(tmp_path / "a" / "0.png", 1)
    (tmp_path / "a" / "1.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="1.png"):
        load_dataset(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match="channels"):
        load_dataset(f"imagefolder:{tmp_path}?channels=2")
