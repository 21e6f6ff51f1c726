"""Property-based tests (hypothesis): the quantizer's error bound and idempotence, bit-exact
sparse storage, and recipe parsing that fails only with our own error type, whatever the input."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modelpress.artifact.checkpoint import load_state, save_artifact
from modelpress.core.errors import ModelpressError
from modelpress.quantization.primitives import (
    QuantSpec,
    broadcast_params,
    dequantize,
    pack_bits,
    quantize,
    quantize_tensor,
    unpack_bits,
)
from modelpress.recipes.schema import Recipe, apply_overrides

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tensor_and_spec(draw):
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    x = torch.from_numpy(draw(arrays(np.float32, (rows, cols), elements=finite32)))
    symmetric = draw(st.booleans())
    spec = QuantSpec(bits=draw(st.integers(2, 8)), symmetric=symmetric,
                     signed=True if symmetric else draw(st.booleans()),
                     granularity=draw(st.sampled_from(["tensor", "channel"])))
    return x, spec


# -- the quantizer --------------------------------------------------------------------------
@FAST
@given(tensor_and_spec())
def test_dequantized_error_is_at_most_half_a_step_inside_the_range(case):
    x, spec = case
    qt = quantize_tensor(x, spec)
    step = broadcast_params(x, qt.scale, spec)
    zero = broadcast_params(x, qt.zero, spec)
    lo, hi = (spec.qmin - zero) * step, (spec.qmax - zero) * step  # the representable range
    err = (x - qt.dequantize()).abs()
    inside = (x >= lo) & (x <= hi)
    tol = step * 1e-4 + x.abs() * 1e-6  # float32 rounding of x / scale
    assert (err[inside] <= (step / 2 + tol)[inside]).all()
    # outside the range values saturate: the error is the distance to the nearest end
    clipped = torch.minimum(torch.maximum(x, lo), hi)
    assert (err[~inside] <= ((x - clipped).abs() + step / 2 + tol)[~inside]).all()
    assert int(qt.q.min()) >= spec.qmin and int(qt.q.max()) <= spec.qmax


@FAST
@given(tensor_and_spec())
def test_quantizing_a_dequantized_tensor_again_changes_nothing(case):
    x, spec = case
    qt = quantize_tensor(x, spec)
    scale, zero = broadcast_params(x, qt.scale, spec), broadcast_params(x, qt.zero, spec)
    once = qt.dequantize()
    q_again = quantize(once, scale, zero, spec.qmin, spec.qmax)
    assert torch.equal(q_again.to(qt.q.dtype), qt.q)  # the same integers ...
    assert torch.equal(dequantize(q_again, scale, zero), once)  # ... so the same values


@FAST
@given(st.integers(2, 8), st.booleans(), st.data())
def test_bit_packing_round_trips(bits, signed, data):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    values = data.draw(st.lists(st.integers(lo, hi), min_size=0, max_size=200))
    q = torch.tensor(values, dtype=torch.int16)
    packed = pack_bits(q, bits, signed)
    assert packed.numel() == (len(values) * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, len(values), signed).to(torch.int16), q)


# -- sparse storage -------------------------------------------------------------------------
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@st.composite
def sparse_tensors(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    n = int(np.prod(shape))
    density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g) * 10 ** draw(st.integers(-3, 3))
    keep = torch.rand(n, generator=g) < density
    t = torch.where(keep, values, torch.zeros(n)).to(dtype)
    # special values survive too: a few of inf, -inf, nan and subnormals at random places
    for special in draw(st.lists(st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e-40, -0.0]),
                                 max_size=3)):
        t[draw(st.integers(0, n - 1))] = special
    return t.reshape(shape)


def _bits(t):
    return t.contiguous().view(INT_VIEW[t.dtype])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(sparse_tensors())
def test_sparse_storage_round_trip_is_bit_exact(tmp_path, t):
    model = torch.nn.Module()
    model.register_buffer("w", t)
    path = save_artifact(model, tmp_path / "m.safetensors")
    back = load_state(path)[0]["w"]
    assert back.dtype == t.dtype and back.shape == t.shape
    # bit-exact: NaN payloads, infinities, subnormals and negative zeros (the sparse encodings store -0.0)
    assert torch.equal(_bits(back), _bits(t))


@functools.lru_cache(maxsize=1)
def _lenet5_artifact_bytes() -> bytes:
    """A LeNet-5 artifact with every kind of piece: raw tensors, sparse encodings, the packed blob."""
    import tempfile

    from modelpress.engine import MethodInputs, run_method
    from modelpress.pruning.magnitude import MagnitudePruning
    from modelpress.zoo.models import build_model

    torch.manual_seed(0)
    model = run_method(build_model("lenet5"), MagnitudePruning(sparsity=0.8), MethodInputs())[0]
    with tempfile.TemporaryDirectory() as tmp:
        return save_artifact(model, Path(tmp) / "m.safetensors").read_bytes()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.floats(0, 1, exclude_max=True), st.integers(0, 7))
def test_every_single_bit_flip_in_tensor_data_is_detected_on_load(tmp_path_factory, where, bit):
    """A flipped bit anywhere in the tensor bytes is a one-line ModelLoadError naming the tensor."""
    import struct

    from modelpress.core.errors import ModelLoadError

    raw = bytearray(_lenet5_artifact_bytes())
    path = tmp_path_factory.mktemp("flip") / "m.safetensors"
    start = 8 + struct.unpack("<Q", raw[:8])[0]  # safetensors: u64 header length, the JSON header, the data
    raw[start + int(where * (len(raw) - start))] ^= 1 << bit
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=r"tensor '[\w.]+' is corrupt") as err:
        load_state(path)
    assert "\n" not in str(err.value) and err.value.hint


# -- recipe parsing -------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=12),
                    st.sampled_from(["prune.magnitude", "quant.weight_only", "lowrank.svd", "stages", "config",
                                     "sparsity", "bits", "scope", "include", "re:[", "type:Linear", "1e400"]))
keys = st.one_of(st.sampled_from(["version", "name", "stages", "method", "config", "finetune", "distill",
                                  "eval", "seed", "sparsity", "bits", "scope", "include", "epochs", "lr", "T",
                                  "batch_sizes", "baseline", "train", "model", "data"]),
                 st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())
structures = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(keys, inner, max_size=5)),
                          max_leaves=25)


def _valid_raw():
    return {"version": 1, "name": "fuzz", "stages": [
        {"method": "prune.magnitude", "config": {"sparsity": 0.5}, "finetune": {"epochs": 1}}]}


def assert_only_our_errors(fn):
    """Assert that ``fn()`` either returns a recipe that serialises, or raises a ModelpressError
    with a one-line message; any other exception fails the calling test."""
    try:
        recipe = fn()
    except ModelpressError as err:
        assert "\n" not in str(err)
        return None
    recipe.to_yaml()  # a recipe that validated must also serialise
    return recipe


@FAST
@given(structures)
def test_any_structure_parses_or_fails_with_our_error(raw):
    assert_only_our_errors(lambda: Recipe.from_dict(raw))


@FAST
@given(st.lists(st.tuples(st.sampled_from(["stages.0", "stages.0.config", "stages.0.finetune", "eval", ""]),
                          keys, structures), min_size=1, max_size=3))
def test_a_valid_recipe_with_fuzzed_fields_parses_or_fails_with_our_error(edits):
    raw = _valid_raw()
    for where, key, value in edits:
        target = raw
        for part in filter(None, where.split(".")):
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict):
                target = target.setdefault(part, {})
            else:  # an earlier edit replaced this path by a scalar or a short list: nothing to edit
                target = None
                break
        if isinstance(target, dict):
            target[key] = value
    assert_only_our_errors(lambda: Recipe.from_dict(raw))


@FAST
@given(st.text(max_size=200))
def test_any_text_file_loads_or_fails_with_our_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    assert_only_our_errors(lambda: Recipe.load(path))


@FAST
@given(structures)
def test_any_yaml_document_loads_or_fails_with_our_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    try:
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    except (yaml.YAMLError, ValueError, RecursionError):
        assume(False)
    assert_only_our_errors(lambda: Recipe.load(path))


@FAST
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_override_applies_or_fails_with_our_error(overrides):
    assert_only_our_errors(lambda: Recipe.from_dict(apply_overrides(_valid_raw(), overrides)))


@pytest.mark.parametrize("text", ["version: 1\nstages: [{method: prune.magnitude}]\nseed: 2001-02-30",
                                  "x: " + "[" * 600 + "]" * 600, "{1: 2}", "stages: &a [*a]"])
def test_known_nasty_documents_fail_with_our_error(tmp_path, text):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ModelpressError):
        Recipe.load(tmp_path / "r.yaml")
