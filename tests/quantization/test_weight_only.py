"""Packed quantized layers (modules.py) and weight-only round-to-nearest PTQ (quant.weight_only)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress import quantize
from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ConfigError
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.modules import (
    QuantConv2d,
    QuantLinear,
    packed_weight_bytes,
    quantize_layer,
    quantized_weight_bytes,
    weight_spec,
)
from modelpress.quantization.primitives import QuantSpec, quantize_tensor, sqnr
from modelpress.quantization.weight_only import WeightOnly, quantize_weight
from modelpress.zoo.models import build_model

SQNR_FLOOR = {8: 38.0, 4: 15.0, 3: 9.0, 2: 3.0}  # dB on Gaussian weights, per-channel, min-max


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.dw(torch.relu(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("group", True), ("tensor", False),
                                                    ("channel", False)])
def test_packed_layer_matches_its_quantized_tensor(bits, granularity, symmetric):
    torch.manual_seed(0)
    fc = nn.Linear(64, 48)
    spec = weight_spec(bits, granularity, group_size=16, symmetric=symmetric)
    q = quantize_layer(fc, spec)
    ref = quantize_tensor(fc.weight.detach(), spec).dequantize()
    assert torch.equal(q.dequantized_weight(), ref)  # packing and unpacking are exact
    assert torch.equal(q.int_weight().reshape(-1).to(torch.int16),
                       quantize_tensor(fc.weight.detach(), spec).q.reshape(-1).to(torch.int16))
    assert q.qweight.numel() == (64 * 48 * bits + 7) // 8
    rows = {"channel": 48, "group": 48 * 64 // 16, "tensor": 1}[granularity]
    zeros = 0 if symmetric else (rows * bits + 7) // 8  # whole numbers: bit-packed in the artifact
    assert quantized_weight_bytes((48, 64), spec) == q.qweight.numel() + rows * 4 + zeros
    floor = SQNR_FLOOR[bits] - (0 if granularity != "tensor" else 3)
    assert sqnr(fc.weight, q.dequantized_weight()) > floor


def test_dequantized_weight_is_cached_and_refreshed_on_load():
    fc = quantize_layer(nn.Linear(32, 32), weight_spec(4))
    w1 = fc.dequantized_weight()
    assert fc.dequantized_weight() is w1  # no second unpack
    other = quantize_layer(nn.Linear(32, 32), weight_spec(4))
    fc.load_state_dict(other.state_dict())
    assert torch.equal(fc.dequantized_weight(), other.dequantized_weight())
    assert "_cache" not in fc.state_dict() and set(fc.state_dict()) == {"qweight", "scale", "bias"}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_only_sqnr_floor_and_info(bits):
    torch.manual_seed(0)
    model = ConvNet().eval()
    q, report = run_method(model, WeightOnly(bits=bits), MethodInputs())
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.dw, QuantConv2d) and isinstance(q.fc, QuantLinear)
    assert isinstance(model.conv1, nn.Conv2d)  # the input model is untouched
    layers = report.info["layers"]
    assert set(layers) == {"conv1", "conv2", "dw", "fc"}
    for name, rep in layers.items():
        assert rep["bits"] == bits
        assert rep["sqnr_db"] > SQNR_FLOOR[bits] - 2, name  # kaiming-uniform weights, a bit below Gaussian
    x = torch.randn(4, 3, 8, 8)
    assert q.conv2.bias is None and q(x).shape == (4, 10)
    if bits == 8:
        assert sqnr(model(x), q(x)) > 30


def test_mse_range_search_beats_minmax_at_low_bits():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    for bits in (2, 3, 4):
        spec = QuantSpec(bits=bits, granularity="channel")
        assert sqnr(w, quantize_weight(w, spec, "mse").dequantize()) > sqnr(w, quantize_weight(w, spec).dequantize())


def test_group_granularity_falls_back_per_layer():
    q, report = run_method(ConvNet(), WeightOnly(bits=4, granularity="group", group_size=64), MethodInputs())
    # inputs per output channel: conv1 27, conv2 144, dw 9 (not multiples of 64: per channel), fc 512
    assert report.info["fallback"] == ["conv1", "conv2", "dw"]
    assert q.fc.qspec.granularity == "group" and q.fc.scale.shape == (10 * 512 // 64, 1)
    assert q.conv1.qspec.granularity == "channel"


def test_keep_first_last_and_scope():
    q = quantize(ConvNet(), WeightOnly(bits=4, keep_first_last=True))
    assert type(q.conv1) is nn.Conv2d and type(q.fc) is nn.Linear and isinstance(q.conv2, QuantConv2d)
    q = quantize(ConvNet(), WeightOnly(bits=4, scope={"include": ["fc"]}))
    assert isinstance(q.fc, QuantLinear) and type(q.conv2) is nn.Conv2d


@pytest.mark.parametrize("field,value", [("bits", 1), ("bits", 9), ("group_size", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"WeightOnly.{field}"):
        WeightOnly(**{field: value})


def test_int4_artifact_is_an_eighth_and_reloads_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5").eval()
    q = quantize(model, WeightOnly(bits=4)).eval()
    fp_path = save_artifact(model, tmp_path / "fp.safetensors")
    q_path = save_artifact(q, tmp_path / "q.safetensors")
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    rows = 6 + 16 + 120 + 84 + 10  # output channels: one fp32 scale each
    assert packed_weight_bytes(q) == weights // 2 + rows * 4  # every layer has an even weight count
    # weights: 4 bits + one fp32 scale per row ~ 1/7.8 of fp32; biases stay fp32; plus the JSON header
    assert packed_weight_bytes(q) < weights * 4 / 7.5
    assert q_path.stat().st_size < fp_path.stat().st_size / 6
    again, header = load_artifact(q_path)
    assert header["structure"]["fc1"]["class"] == "QuantLinear"
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(again(x), q(x))
    for k, v in q.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_asymmetric_group_and_act_quant_reload_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    q = quantize(model, WeightOnly(bits=3, granularity="group", group_size=16, symmetric=False)).eval()
    q.fc = quantize_layer(model.fc, weight_spec(4), act_bits=8)
    q.fc.set_act_qparams(torch.tensor(0.05), torch.tensor(3.0))
    path = save_artifact(q, tmp_path / "q.safetensors")
    again, _ = load_artifact(path, base_model=ConvNet())
    assert again.fc.act_bits == 8 and again.conv2.qspec.symmetric is False
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(again(x), q(x))
