"""Artifact format 2 (small pieces packed into one blob, deflated header) and format-1 files still loading."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from modelpress import MagnitudePruning, Scope, prune, quantize
from modelpress.artifact import checkpoint
from modelpress.artifact.checkpoint import FORMAT, FORMAT_V1, PACK_BELOW, PACKED, load_state, read_header, save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ModelLoadError
from modelpress.core.masks import get_mask
from modelpress.quantization.codebook import CodebookLinear, WeightSharing
from modelpress.zoo.models import build_model

DATA = Path(__file__).parent / "data"


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert raw_bytes(a[k]) == raw_bytes(b[k]), k  # bit-exact: -0.0, NaN payloads included


def safetensors_header_bytes(path) -> int:
    return 8 + struct.unpack("<Q", Path(path).read_bytes()[:8])[0]


class Mixed(nn.Module):
    """Every kind of piece: sparse fp32 (bitmask / relidx), fp16, bf16, int8, bool, 0-dim, a tensor over
    PACK_BELOW bytes, a tied weight and special float values."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 64)
        self.b = nn.Linear(32, 48, bias=False).half()
        self.big = nn.Linear(64, 64)  # 16 KB: stays a safetensors tensor of its own
        self.tied = self.a  # the same parameters under two names
        self.register_buffer("codes", torch.arange(-20, 20, dtype=torch.int8))
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("scale", torch.tensor(0.125, dtype=torch.bfloat16))
        self.register_buffer("odd", torch.tensor([-0.0, float("nan"), float("inf"), 1e-45]))


def mixed_model() -> Mixed:
    torch.manual_seed(0)
    m = Mixed()
    with torch.no_grad():
        # very sparse: relidx; half: bitmask (+0.0: zeros lose their sign, no -0.0)
        m.a.weight.mul_((torch.rand_like(m.a.weight) > 0.95).float()).add_(0.0)
        m.big.weight.mul_((torch.rand_like(m.big.weight) > 0.5).float()).add_(0.0)
    return m


def test_round_trip_of_the_packed_layout_is_bit_exact(tmp_path):
    m = mixed_model()
    path = save_artifact(m, tmp_path / "m.safetensors")
    header = read_header(path)
    assert header["format"] == FORMAT == "modelpress.artifact/2"
    assert header["ties"] == {"tied.weight": "a.weight", "tied.bias": "a.bias"}
    assert header["encodings"]["a.weight"]["kind"] == "relidx"
    assert header["encodings"]["big.weight"]["kind"] == "sparse"
    with safe_open(str(path), framework="pt") as fh:
        stored = set(fh.keys())
    big = {k for k, v in load_file(str(path)).items() if k != PACKED and v.numel() * v.element_size() >= PACK_BELOW}
    assert stored == {PACKED} | big and big == {"big.weight::values"}  # everything smaller shares the blob
    assert {k for k, _, _ in header["packed"]} >= {"codes", "flags", "scale", "odd", "b.weight", "a.weight::gaps"}
    state, _ = load_state(path)
    assert_same_state(state, m.state_dict())
    again, _ = load_artifact(path, base_model=Mixed())
    x = torch.randn(3, 48)
    assert torch.equal(again.a(x), m.a(x)) and again.tied is again.a


def test_format1_artifact_still_loads_bit_exact(tmp_path):
    # format1-mlp.safetensors was written by modelpress 03fa7ab (format 1) from:
    #   torch.manual_seed(0); m = Sequential(Linear(40, 64), ReLU(), Linear(64, 64), ReLU(), Linear(64, 10))
    #   q = quantize(prune(m, MagnitudePruning(sparsity=0.9, keep_first_last=False)),
    #                WeightSharing(bits=3, scope=Scope(include=["2"])))
    #   save_artifact(q, path, meta={"note": "format 1 fixture"})
    # and format1-mlp.expected.json holds dtype, shape and sha256 of each tensor it decoded to.
    path = DATA / "format1-mlp.safetensors"
    expected = json.loads((DATA / "format1-mlp.expected.json").read_text())
    state, header = load_state(path)
    assert header["format"] == FORMAT_V1
    assert {k: v["kind"] for k, v in header["encodings"].items()} == {
        "0.weight": "sparse", "2.indices": "huffman", "4.weight": "relidx"}
    assert {k: [str(v.dtype), list(v.shape), hashlib.sha256(raw_bytes(v)).hexdigest()]
            for k, v in state.items()} == expected
    base = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model, _ = load_artifact(path, base_model=base)
    assert isinstance(model[2], CodebookLinear) and model[2].levels <= 8
    assert torch.equal(get_mask(model[0]), (model[0].weight != 0).float())  # masks come back
    # Saved again, it becomes format 2: smaller, same tensors, indices still Huffman-coded.
    new = save_artifact(model, tmp_path / "new.safetensors", meta={"note": "format 1 fixture"})
    assert new.stat().st_size < path.stat().st_size - 500
    state2, header2 = load_state(new)
    assert header2["format"] == FORMAT and header2["encodings"]["2.indices"]["kind"] == "huffman"
    assert_same_state(state2, state)
    x = torch.linspace(-1, 1, 120).reshape(3, 40)
    assert torch.equal(load_artifact(new, base_model=base)[0](x), model(x))


def test_header_of_a_tiny_model_is_small(tmp_path):
    lin = nn.Linear(4, 2)  # 40 bytes of weights
    path = save_artifact(lin, tmp_path / "lin.safetensors")
    assert path.stat().st_size - 40 <= 160  # format 1 spent ~380 bytes here
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    path = save_artifact(mlp, tmp_path / "mlp.safetensors")
    payload = sum(v.numel() * v.element_size() for v in mlp.state_dict().values())
    assert path.stat().st_size - payload <= 256
    # LeNet-5 with k-means weight sharing: 10 tensors + the structure of 5 rebuilt layers
    q = quantize(build_model("lenet5"), WeightSharing(bits=3))
    path = save_artifact(q, tmp_path / "q.safetensors", meta={"stage": "share", "method": "quant.kmeans"})
    assert safetensors_header_bytes(path) <= 450  # format 1: ~1,900 bytes; checksums: 5 bytes a stored piece


def test_loaded_codebook_model_keeps_its_huffman_encoding_when_saved_again(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    q = quantize(prune(m, MagnitudePruning(sparsity=0.9, keep_first_last=False)),
                 WeightSharing(bits=3, layer_bits={}, scope=Scope(include=["0", "2"])))
    first = save_artifact(q, tmp_path / "a.safetensors")
    loaded, _ = load_artifact(first, base_model=m)  # a fresh model: no modelpress_encodings of its own
    second = save_artifact(loaded, tmp_path / "b.safetensors")
    assert read_header(second)["encodings"] == read_header(first)["encodings"]
    assert second.stat().st_size == first.stat().st_size


def _rewrite(path: Path, out: Path, *, metadata=None, drop_bytes: int = 0):
    """Copy an artifact with other metadata or a shorter blob (a corrupt file)."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    if drop_bytes:
        tensors[PACKED] = tensors[PACKED][:-drop_bytes].clone()
    save_file(tensors, str(out), metadata=metadata or meta)
    return out


def test_corrupt_or_unknown_format2_files_are_clear_errors(tmp_path):
    path = save_artifact(mixed_model(), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        value = fh.metadata()["modelpress"]
    cases = {
        "flipped": ({"modelpress": value[:10] + ("0" if value[10] != "0" else "1") + value[11:]}, 0, "corrupt"),
        "cut": ({"modelpress": value[: len(value) // 2]}, 0, "corrupt"),
        "future": ({"modelpress": "3:" + value[2:]}, 0, "cannot read"),
        "short blob": (None, 4, "packed-tensor index"),
    }
    for name, (meta, drop, message) in cases.items():
        bad = _rewrite(path, tmp_path / f"{name}.safetensors", metadata=meta, drop_bytes=drop)
        with pytest.raises(ModelLoadError, match=message):
            load_state(bad)


def test_packing_skips_dtypes_it_does_not_know(tmp_path):
    m = nn.Module()
    m.register_buffer("c", torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64))
    m.register_buffer("f", torch.ones(3))
    path = save_artifact(m, tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        assert set(fh.keys()) == {"c", PACKED}
    assert_same_state(load_state(path)[0], m.state_dict())


def test_packed_index_lists_pieces_in_blob_order(tmp_path):
    m = mixed_model()
    path = save_artifact(m, tmp_path / "m.safetensors")
    index = read_header(path)["packed"]
    sizes = [torch.Size(shape).numel() * checkpoint._CODE_DTYPES[code].itemsize for _, code, shape in index]
    assert sum(sizes) == load_file(str(path))[PACKED].numel()


def test_asymmetric_int4_group_128_is_stored_in_at_most_4_3_bits_per_weight(tmp_path):
    """Issue 16: zero points are whole numbers: stored bit-packed (4 bits each), not as fp32."""
    from modelpress.quantization.weight_only import WeightOnly
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 512, bias=False), nn.ReLU(), nn.Linear(512, 256, bias=False))
    q = quantize(net, WeightOnly(bits=4, granularity="group", group_size=128, symmetric=False))
    path = save_artifact(q, tmp_path / "q.safetensors")
    stored, header = checkpoint.read_stored(path)
    assert header["encodings"]["0.zero"]["kind"] == "integral"
    weights = 1024 * 512 + 512 * 256
    layer_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if k.split(".")[0] in ("0", "2"))
    assert 8 * layer_bytes / weights <= 4.3  # 4 + 32 / 128 (fp32 scales) + 4 / 128 (zero points) = 4.28
    assert Path(path).stat().st_size * 8 / weights < 4.3 + 0.05  # the whole file, header included
    again, _ = load_artifact(path, base_model=net)
    x = torch.randn(4, 1024)
    assert torch.equal(again(x), q(x)) and torch.equal(again[0].zero, q[0].zero)
