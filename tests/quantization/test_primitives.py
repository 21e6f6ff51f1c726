"""The affine quantizer: error bounds, SQNR floors, STE / LSQ gradients, bit packing."""
from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import ConfigError, DataError
from modelpress.quantization.primitives import (
    QuantSpec,
    broadcast_params,
    fake_quantize,
    fake_quantize_tensor,
    lsq_fake_quantize,
    minmax,
    pack_bits,
    packed_nbytes,
    qparams,
    quantize_tensor,
    sqnr,
    unpack_bits,
)

W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))

# Gaussian weights, round-to-nearest on the min/max range; measured (symmetric, asymmetric) in dB:
# tensor 8b 40.6/40.6, 4b 15.5/16.1, 2b 0.6/2.5; channel 8b 43.5/44.4, 4b 18.4/19.9;
# group-32 8b 45.4/46.4, 4b 20.3/21.8 (~6 dB per bit). Floors sit ~1 dB below.
FLOORS = {"tensor": {8: 39, 6: 27, 4: 14.5, 3: 7, 2: 0},
          "channel": {8: 42, 6: 30, 4: 17, 3: 10, 2: 1.5},
          "group": {8: 44, 6: 32, 4: 19, 3: 11.5, 2: 3}}


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_sqnr_floor_per_bits_and_granularity(bits, granularity, symmetric):
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=32, symmetric=symmetric)
    assert sqnr(W, quantize_tensor(W, spec).dequantize()) > FLOORS[granularity][bits]


def test_finer_granularity_is_never_worse():
    got = [sqnr(W, quantize_tensor(W, QuantSpec(bits=4, granularity=g, group_size=16)).dequantize())
           for g in ("tensor", "channel", "group")]
    assert got[0] < got[1] < got[2]


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(symmetric):
    spec = QuantSpec(bits=4, granularity="channel", symmetric=symmetric)
    qt = quantize_tensor(W, spec)
    step = broadcast_params(W, qt.scale, spec)
    assert ((W - qt.dequantize()).abs() <= step / 2 + 1e-6).all()
    assert qt.q.min() >= spec.qmin and qt.q.max() <= spec.qmax


def test_zero_is_exact_and_quantizing_twice_changes_nothing():
    x = torch.cat([torch.zeros(5), torch.rand(20) * 3 + 0.5])
    spec = QuantSpec(bits=8, symmetric=False, signed=False)
    once = fake_quantize_tensor(x, spec)
    assert (once[:5] == 0).all()
    lo, hi = minmax(x, spec)
    assert torch.allclose(fake_quantize_tensor(once, spec, lo, hi), once, atol=1e-6)


def test_ranges_are_widened_to_include_zero():
    spec = QuantSpec(bits=8, symmetric=False, signed=False)
    scale, zero = qparams(torch.tensor([[1.0]]), torch.tensor([[3.0]]), spec)
    assert zero.item() == 0 and scale.item() == pytest.approx(3 / 255)


def test_ste_passes_gradient_inside_the_range_and_blocks_it_outside():
    x = torch.tensor([-5.0, -0.3, 0.0, 0.4, 5.0], requires_grad=True)
    scale, zero = torch.tensor(0.01), torch.tensor(0.0)  # range [-1.28, 1.27]
    fake_quantize(x, scale, zero, -128, 127).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_scale_gets_a_gradient_and_learns():
    torch.manual_seed(0)
    x = torch.randn(256) * 2
    scale = torch.tensor(0.05, requires_grad=True)  # far too small for 4 bits: clips most of x
    opt = torch.optim.Adam([scale], lr=0.05)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = (lsq_fake_quantize(x, scale, torch.tensor(0.0), -8, 7) - x).pow(2).mean()
        loss.backward()
        first = first if first is not None else loss.item()
        opt.step()
    assert scale.item() > 0.2 and loss.item() < first / 4


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_is_bit_exact_and_tight(bits, signed):
    spec = QuantSpec(bits=bits, symmetric=signed, signed=signed)
    q = torch.randint(spec.qmin, spec.qmax + 1, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(q, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(1001, bits) == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001, signed), q.to(torch.int16))


def test_bad_specs_name_the_field():
    with pytest.raises(ConfigError, match="QuantSpec.bits"):
        QuantSpec(bits=9)
    with pytest.raises(ConfigError, match="QuantSpec.bits"):
        QuantSpec(bits=1)
    with pytest.raises(ConfigError, match="signed"):
        QuantSpec(symmetric=True, signed=False)
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        quantize_tensor(W, QuantSpec(granularity="group", group_size=48))
    with pytest.raises(DataError, match="NaN"):
        quantize_tensor(torch.tensor([1.0, float("nan")]), QuantSpec())


def test_sqnr_values():
    assert sqnr(W, W) == float("inf")
    assert sqnr(torch.ones(4), torch.ones(4) * 1.1) == pytest.approx(20.0)
