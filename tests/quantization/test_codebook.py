"""Weight sharing (quant.kmeans), power-of-two levels (quant.log2) and Huffman storage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modelpress import MagnitudePruning, TrainConfig, prune, quantize
from modelpress.artifact.checkpoint import read_header, save_artifact
from modelpress.artifact.huffman import (
    decode_indices,
    describe,
    encode_indices,
    huffman_decode,
    huffman_encode,
    pack_fixed,
)
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ConfigError, ModelLoadError, ScopeError
from modelpress.core.masks import strip_masks
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.codebook import (
    CodebookConv2d,
    CodebookLinear,
    PowerOfTwo,
    WeightSharing,
    codebook_layer,
    kmeans_codebook,
)
from modelpress.quantization.primitives import QuantSpec, quantize_tensor, sqnr
from modelpress.zoo.models import build_model


def gaussian(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- k-means weight sharing ------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_kmeans_levels_and_sqnr_beat_uniform(bits):
    w = gaussian((64, 256))
    codebook, codes, zero_code = kmeans_codebook(w, bits)
    shared = codebook[codes.long()]
    assert not zero_code and codebook.numel() <= 2 ** bits
    assert shared.unique().numel() <= 2 ** bits
    uniform = quantize_tensor(w, QuantSpec(bits=bits, symmetric=False, signed=False)).dequantize()
    # Lloyd-Max levels fit a Gaussian better than an even grid at the same index width
    # (clearly at few bits; at 8 bits both are fine and 50 Lloyd steps only just win).
    assert sqnr(w, shared) > sqnr(w, uniform) + (0.5 if bits <= 5 else 0.0)
    assert sqnr(w, shared) > 5.5 * bits - 4  # about 6 dB per bit


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_every_init_converges_to_a_good_codebook(init):
    w = gaussian((32, 128), seed=1)
    codebook, codes, _ = kmeans_codebook(w, 4, init=init)
    assert sqnr(w, codebook[codes.long()]) > 18
    assert torch.all(codebook[1:] > codebook[:-1])  # sorted, no empty clusters left


def pruned_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    return strip_masks(prune(m, MagnitudePruning(sparsity=0.8, keep_first_last=False)))


def test_pruned_zeros_stay_zero_after_clustering_and_fine_tune(toy_data):
    train, test = toy_data
    m = pruned_mlp()
    zeros = {i: m[i].weight == 0 for i in (0, 2, 4)}
    q = quantize(m, WeightSharing(bits=3, layer_bits={"4": 2}))
    for i, z in zeros.items():
        assert torch.equal(q[i].weight == 0, z)  # exactly the pruned positions, nothing else
        assert q[i].zero_code and q[i].levels <= (2 if i == 4 else 8)
    before = [q[i].codebook.detach().clone() for i in (0, 2, 4)]
    tuned, report = run_method(m, WeightSharing(bits=3, layer_bits={"4": 2}),
                               MethodInputs(data=train, train=TrainConfig(epochs=3, lr=1e-2)))
    assert report.trained
    for i, z in zeros.items():
        assert torch.equal(tuned[i].weight == 0, z)
        assert tuned[i].weight.unique().numel() <= tuned[i].levels + 1
    assert any(not torch.equal(b.half(), tuned[i].codebook.detach()) for b, i in zip(before, (0, 2, 4)))


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 1.0, -1.0], [2.0, 1.0, 0.0]]))
    codebook, codes, zero_code = kmeans_codebook(layer.weight, 1)  # two centroids: -1 and the rest
    q = codebook_layer(layer, codebook, codes, zero_code)
    assert zero_code and codebook.tolist() == pytest.approx([-1.0, 4 / 3])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    q(x).mul(torch.tensor([[1.0, 10.0]])).sum().backward()
    # dL/dW[o, i] = g[o] * x[i]; weights (0,1), (1,0), (1,1) share centroid 1, (0,2) centroid 0.
    grad_w = torch.tensor([[1.0], [10.0]]) * x
    expected = [grad_w[0, 2], grad_w[0, 1] + grad_w[1, 0] + grad_w[1, 1]]
    assert q.codebook.grad.tolist() == [float(v) for v in expected]  # 3, 2 + 10 + 20


def test_bad_bits_name_the_field():
    with pytest.raises(ConfigError, match=r"WeightSharing\.bits"):
        WeightSharing(bits=0)
    with pytest.raises(ConfigError, match=r"WeightSharing\.bits"):
        WeightSharing(bits=9)
    with pytest.raises(ConfigError, match=r"WeightSharing\.layer_bits.*'fc1'.*1\.\.8"):
        WeightSharing(layer_bits={"fc1": 9})
    with pytest.raises(ConfigError, match=r"PowerOfTwo\.bits"):
        PowerOfTwo(bits=1)
    with pytest.raises(ScopeError, match="layer_bits names 'nope'"):
        quantize(build_model("lenet5"), WeightSharing(layer_bits={"nope": 4}))


def test_layer_bits_precedence_name_over_pattern_over_type():
    cfg = WeightSharing(bits=5, layer_bits={"type:Conv2d": 8, "re:fc.": 3, "fc2": 6})
    m = build_model("lenet5")
    got = {n: cfg.bits_for(n, getattr(m, n)) for n in ("conv1", "fc1", "fc2", "fc3")}
    assert got == {"conv1": 8, "fc1": 3, "fc2": 6, "fc3": 3}


# -- artifacts --------------------------------------------------------------------------
def test_artifact_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    base = strip_masks(prune(build_model("lenet5"), MagnitudePruning(sparsity=0.9, keep_first_last=False)))
    q = quantize(base, WeightSharing()).eval()
    assert isinstance(q.conv1, CodebookConv2d) and isinstance(q.fc1, CodebookLinear)
    path = save_artifact(q, tmp_path / "q.safetensors")
    header = read_header(path)
    assert header["encodings"]["fc1.indices"]["kind"] == "huffman"
    loaded, _ = load_artifact(path)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert loaded.fc1.codebook.dtype == torch.float16 and loaded.fc1.indices.dtype == torch.uint8
    # Indices on disk, not floats: far below even the fp16 sparse weights.
    assert path.stat().st_size < 0.1 * sum(p.numel() * 4 for p in base.parameters())
    # The state_dict packs codebook + bias into one "table"; a module built from its spec
    # takes the codebook's length and dtype from it (strict load, nothing missing or extra).
    assert set(q.fc1.state_dict()) == {"table", "indices"}
    fresh = CodebookLinear.from_spec(q.fc1.spec())
    fresh.load_state_dict(q.fc1.state_dict())
    assert torch.equal(fresh.weight, q.fc1.weight) and torch.equal(fresh.bias, q.fc1.bias)


def test_corrupt_payload_is_a_load_error():
    t = torch.zeros(40, 40, dtype=torch.uint8)
    t[::3, ::2] = 7
    parts, info = encode_indices(t)
    with pytest.raises(ModelLoadError):
        decode_indices({"data": parts["data"][:-3]}, info)


# -- power-of-two levels ----------------------------------------------------------------
def test_log2_levels_are_powers_of_two():
    m = pruned_mlp()
    q, report = run_method(m, PowerOfTwo(bits=4, keep_first_last=False), MethodInputs())
    for i in (0, 2, 4):
        levels = q[i].weight.detach().unique()
        nonzero = levels[levels != 0].abs().double()
        assert torch.equal(torch.log2(nonzero), torch.log2(nonzero).round())
        assert torch.log2(nonzero).unique().numel() <= 2 ** 3 - 1  # 7 exponents per sign
        assert (q[i].weight[m[i].weight == 0] == 0).all()  # pruned zeros stay zero
        assert report.info["layers"][str(i)]["sqnr_db"] > 10


def test_log2_keeps_first_and_last_layer_float_by_default():
    q = quantize(pruned_mlp(), PowerOfTwo())
    assert isinstance(q[0], nn.Linear) and isinstance(q[2], CodebookLinear) and isinstance(q[4], nn.Linear)


# -- Huffman ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=400), st.integers(0, 2 ** 16))
def test_huffman_round_trip_is_bit_exact(symbols, seed):
    # Skew the hypothesis sample: repeat small symbols so code lengths differ a lot.
    rng = np.random.default_rng(seed)
    s = np.concatenate([np.array(symbols, np.int64), rng.geometric(0.3, size=rng.integers(0, 500)) - 1])
    bits, lengths = huffman_encode(s)
    assert np.array_equal(huffman_decode(bits, lengths, len(s)), s)


@pytest.mark.parametrize("s", [[], [7], [3] * 1000, [0, 1], list(range(256))])
def test_huffman_edge_cases(s):
    s = np.array(s, np.int64)
    bits, lengths = huffman_encode(s)
    assert np.array_equal(huffman_decode(bits, lengths, len(s)), s)
    if len(set(s.tolist())) == 1:
        assert bits.nbytes == math.ceil(len(s) / 8)  # one symbol: one bit each


def test_huffman_code_lengths_are_limited_and_decode_extreme_skew():
    s = np.concatenate([np.full(1 << 18, 0)] + [np.full(1 << i, i + 1) for i in range(18)])
    np.random.default_rng(0).shuffle(s)
    bits, lengths = huffman_encode(s)
    assert lengths.max() <= 15
    assert np.array_equal(huffman_decode(bits, lengths, len(s)), s)


def test_huffman_beats_plain_packing_on_skewed_indices():
    rng = np.random.default_rng(0)
    s = np.minimum(rng.geometric(0.4, size=20_000) - 1, 15)  # 4-bit codes, most of them small
    bits, lengths = huffman_encode(s)
    assert bits.nbytes + 8 < 0.75 * pack_fixed(s, 4).nbytes
    t = torch.from_numpy(s.astype(np.uint8))
    huff, _ = encode_indices(t, huffman=True)
    plain, _ = encode_indices(t, huffman=False)
    assert huff["data"].numel() < 0.75 * plain["data"].numel()


@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 1.0])
def test_index_encoding_round_trip_dense_and_sparse(density):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(1, 32, (120, 400), generator=g, dtype=torch.uint8)
    t[torch.rand(120, 400, generator=g) >= density] = 0
    for use_huffman in (True, False):
        parts, info = encode_indices(t, huffman=use_huffman)
        assert torch.equal(decode_indices(parts, info), t)
    layout = describe(encode_indices(t)[0]["data"])["layout"]
    assert layout == ("dense" if density == 1.0 else "sparse")
