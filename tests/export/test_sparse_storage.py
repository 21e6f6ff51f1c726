import pytest
import torch
from torch import nn

from modelpress import MagnitudePruning, prune
from modelpress.artifact import checkpoint
from modelpress.artifact.checkpoint import load_state, save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.artifact.relidx import decode_relidx, encode_relidx, relative_gaps
from modelpress.core.errors import ModelLoadError
from modelpress.core.masks import get_mask
from modelpress.zoo.models import build_model

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bit_exact(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def sparse_tensor(shape, density, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < density
    values = torch.randn(shape, generator=g) + 3.0  # never exactly zero
    return (values * keep).to(dtype).abs()  # abs: no -0.0, whose sign is not stored


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("case", ["all_zero", "no_zero", "first_last", "long_gaps", "random_5", "random_50"])
def test_relidx_round_trip_is_bit_exact(bits, case):
    t = {
        "all_zero": lambda: torch.zeros(300),
        "no_zero": lambda: torch.arange(1, 301, dtype=torch.float32),
        "first_last": lambda: torch.zeros(300).index_fill_(0, torch.tensor([0, 299]), 7.0),
        "long_gaps": lambda: torch.zeros(70_000).index_fill_(0, torch.tensor([5, 69_999]), -1.5),
        "random_5": lambda: sparse_tensor((64, 50), 0.05),
        "random_50": lambda: sparse_tensor((8, 3, 5, 5), 0.5),
    }[case]()
    parts, info = encode_relidx(t, bits)
    assert info["bits"] == bits
    assert_bit_exact(decode_relidx(parts, info), t)


def test_fillers_bridge_gaps_longer_than_the_index_width():
    positions = torch.tensor([0, 40, 41, 1000]).numpy()
    gaps, real = relative_gaps(positions, 4)  # 4 bits: one entry moves at most 16 positions
    # 39 zeros before 40 -> 2 fillers; 958 before 1000 -> 59 fillers (Deep Compression's padding zeros)
    assert len(gaps) == 4 + 2 + 59 and real.tolist() == [0, 3, 4, 64]
    assert gaps.max() <= 15 and ((gaps + 1).cumsum() - 1)[real].tolist() == [0, 40, 41, 1000]
    t = torch.zeros(1001)
    t[positions] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    parts, info = encode_relidx(t, 4)
    assert info["count"] == 65 and parts["values"].numel() == 65 and parts["gaps"].numel() == 33
    assert torch.equal(decode_relidx(parts, info), t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relidx_keeps_half_precision_and_special_values(dtype):
    t = sparse_tensor((40, 40), 0.1, dtype=dtype)
    t[0, 0], t[5, 5], t[7, 1] = float("nan"), float("inf"), -2.5
    parts, info = encode_relidx(t)
    assert_bit_exact(decode_relidx(parts, info), t)


def test_corrupt_relidx_parts_are_load_errors():
    parts, info = encode_relidx(sparse_tensor((100,), 0.2), 8)
    with pytest.raises(ModelLoadError, match="corrupt"):
        decode_relidx({**parts, "values": parts["values"][:-1]}, info)
    with pytest.raises(ModelLoadError, match="past the tensor"):
        decode_relidx(parts, {**info, "shape": [10]})


def test_save_keeps_the_smallest_encoding_per_tensor(tmp_path):
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100), nn.Linear(100, 100))
    with torch.no_grad():
        model[0].weight.copy_(sparse_tensor((100, 100), 0.5))    # bitmask: 1 bit per weight beats 8 per entry
        model[1].weight.copy_(sparse_tensor((100, 100), 0.02))   # relative index: few, short entries
        model[2].weight.copy_(sparse_tensor((100, 100), 0.97))   # nearly dense: raw
    path = save_artifact(model, tmp_path / "best.safetensors")
    kinds = {k: v["kind"] for k, v in checkpoint.read_header(path)["encodings"].items()}
    assert kinds == {"0.weight": "sparse", "1.weight": "relidx"}
    state, _ = load_state(path)
    for k, v in model.state_dict().items():
        assert_bit_exact(state[k], v)
    for only in (["sparse"], ["relidx"]):  # either encoding alone gives a bigger file
        with pytest.MonkeyPatch.context() as mp:  # the automatic encodings save_artifact tries
            mp.setattr(checkpoint, "auto_encodings", lambda only=only: list(only))
            single = save_artifact(model, tmp_path / f"{only[0]}.safetensors")
        assert path.stat().st_size < single.stat().st_size


@pytest.mark.parametrize("sparsity", [0.9, 0.95])
def test_sparse_lenet5_is_smaller_on_disk_and_reloads_exactly(tmp_path, sparsity):
    torch.manual_seed(0)
    model = build_model("lenet5")
    p = prune(model, MagnitudePruning(sparsity=sparsity))
    dense_bytes = sum(t.numel() * t.element_size() for t in p.state_dict().values())
    path = save_artifact(p, tmp_path / "lenet5.safetensors")
    assert path.stat().st_size * 6 < dense_bytes
    again, header = load_artifact(path)  # rebuilt from the zoo spec
    for k, v in p.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert set(header["encodings"]) == {"conv2.weight", "fc1.weight", "fc2.weight"}
    assert torch.equal(get_mask(again.fc1), (p.fc1.weight != 0).float())
