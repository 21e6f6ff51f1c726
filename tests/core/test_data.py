import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from modelpress.core.data import Data, call_model, check_finite, split_batch
from modelpress.core.errors import DataError


def test_sources_all_yield_batches():
    x, y = torch.randn(10, 3), torch.arange(10)
    ds = TensorDataset(x, y)
    assert [b[0].shape[0] for b in Data(ds, batch_size=4)] == [4, 4, 2]
    assert len(Data(ds, batch_size=4)) == 3
    assert [b.shape[0] for b in Data(x, batch_size=5)] == [5, 5]
    assert len(list(Data(DataLoader(ds, batch_size=3)))) == 4
    assert len(list(Data([(x, y), (x, y)]))) == 2
    assert len(list(Data([x, x], limit=1))) == 1


def test_transform_applies_per_item_for_datasets_and_per_batch_for_lists():
    x = torch.ones(6, 2)
    ds = TensorDataset(x)
    got = list(Data(ds, batch_size=3, transform=lambda item: (item[0] * 2, torch.tensor(1))))
    assert torch.equal(got[0][0], torch.full((3, 2), 2.0)) and got[0][1].tolist() == [1, 1, 1]
    got = list(Data([x], transform=lambda b: b + 1))
    assert torch.equal(got[0], x + 1)


def test_batch_conventions():
    x = torch.randn(2, 3)
    assert split_batch(x)[1] is None
    assert split_batch((x, 1))[1] == 1
    inputs, target = split_batch({"input_ids": x, "labels": 5})
    assert list(inputs) == ["input_ids"] and target == 5
    lin = torch.nn.Linear(3, 1)
    assert call_model(lin, x).shape == (2, 1)


def test_empty_and_non_finite_data_are_errors():
    with pytest.raises(DataError, match="empty"):
        list(Data([]))
    with pytest.raises(DataError, match="NaN or Inf"):
        check_finite(torch.tensor([1.0, float("nan")]), "calibration data")
    with pytest.raises(DataError):
        Data(None)


def test_preflight_checks_leave_the_global_rng_alone():
    """Reading a shuffling DataLoader draws from torch's global RNG; the checks a run makes
    before it starts must not change what the run then computes."""
    from torch.utils.data import DataLoader, TensorDataset

    from modelpress.core.data import check_finite_data, check_model_accepts, first_inputs_if_reusable

    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.zeros(64)), batch_size=8, shuffle=True)
    model = torch.nn.Linear(4, 2)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_finite_data(loader, "data")
    check_model_accepts(model, first_inputs_if_reusable(loader), "data")
    assert torch.equal(torch.rand(3), expected)
