"""AdaRound learned rounding and bias correction (quant.adaround)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress import quantize
from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ConfigError, DataError
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.adaround import AdaRound, adaround_weight, output_mse, rectified_sigmoid
from modelpress.quantization.modules import QuantConv2d, QuantLinear, weight_spec
from modelpress.quantization.primitives import qparams
from modelpress.quantization.weight_only import weight_ranges


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def smooth_images(n, channels=1, size=8, generator=None):
    """Blurred noise with a positive mean: neighbouring inputs correlate, as in real images.

    (On i.i.d. inputs the output error is proportional to the weight error, so round-to-nearest
    is already optimal and learned rounding has nothing to gain.)
    """
    noise = torch.randn(n, channels, size + 2, size + 2, generator=generator)
    return F.avg_pool2d(noise, 3, 1) * 2 + 0.5


def calib(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [smooth_images(32, generator=g) for _ in range(n)]


def test_rectified_sigmoid_range():
    h = rectified_sigmoid(torch.tensor([-20.0, 0.0, 20.0]))
    assert h.tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("layer", [nn.Linear(48, 32), nn.Conv2d(4, 8, 3, padding=1)])
def test_adaround_beats_round_to_nearest_on_layer_output(layer):
    torch.manual_seed(0)
    if isinstance(layer, nn.Linear):  # correlated post-ReLU features
        x = torch.relu(torch.randn(128, 48) @ torch.randn(48, 48) / 48 ** 0.5 + 0.3)
    else:
        x = smooth_images(64, channels=4, size=6)
    with torch.no_grad():
        y = layer(x)
    spec = weight_spec(4)
    scale, zero = qparams(*weight_ranges(layer.weight, spec), spec)
    rtn = adaround_weight(layer, x, y, spec, scale, zero, iterations=0)
    ada = adaround_weight(layer, x, y, spec, scale, zero, iterations=300)
    mse_rtn = output_mse(layer, x, y, rtn.dequantize(), layer.bias)
    mse_ada = output_mse(layer, x, y, ada.dequantize(), layer.bias)
    assert mse_ada < 0.7 * mse_rtn, (mse_rtn, mse_ada)  # measured: about half
    # learned rounding only ever picks floor or ceil: at most one step away from round-to-nearest
    assert (ada.q.int() - rtn.q.int()).abs().max() <= 1
    assert 0 < float((ada.q != rtn.q).float().mean()) < 0.5


def test_method_reports_lower_output_mse_per_layer_and_packs():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    q, report = run_method(model, AdaRound(bits=4, iterations=200, bias_correction=False),
                           MethodInputs(data=calib()))
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.fc, QuantLinear) and q.conv2.bias is None
    layers = report.info["layers"]
    for name, rep in layers.items():
        assert rep["mse_adaround"] <= rep["mse_rtn"] * 1.001, name
    assert sum(r["mse_adaround"] for r in layers.values()) < 0.8 * sum(r["mse_rtn"] for r in layers.values())
    x = calib(1, seed=1)[0]
    with torch.no_grad():
        ref = model(x)
        rtn_out = quantize(model, AdaRound(bits=4, iterations=0, bias_correction=False), calib())(x)
        err_ada = (q(x) - ref).pow(2).mean()
        err_rtn = (rtn_out - ref).pow(2).mean()
    assert err_ada < err_rtn  # held-out inputs too


def test_bias_correction_removes_the_mean_output_shift():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # a layer whose 3-bit rounding shifts the output mean
        model.conv2.weight.add_(0.05)
    data = calib()
    x = torch.cat(calib(4, seed=5))  # held out
    plain = quantize(model, AdaRound(bits=3, iterations=0, bias_correction=False), data)
    corrected, report = run_method(model, AdaRound(bits=3, iterations=0, bias_correction=True),
                                   MethodInputs(data=data))
    assert corrected.conv2.bias is not None  # added to a bias-free conv
    with torch.no_grad():
        ref = model(x)
        shift_plain = (plain(x) - ref).mean(0).abs().mean()
        shift_corr = (corrected(x) - ref).mean(0).abs().mean()
    assert shift_corr < 0.5 * shift_plain, (shift_plain, shift_corr)
    for rep in report.info["layers"].values():
        assert rep["mse_corrected"] <= rep["mse_rtn"] + 1e-9


def test_artifact_reloads_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    q = quantize(model, AdaRound(bits=4, iterations=50), calib()).eval()
    path = save_artifact(q, tmp_path / "q.safetensors")
    again, _ = load_artifact(path, base_model=SmallCNN())
    x = calib(1, seed=3)[0]
    assert torch.equal(again(x), q(x))
    assert again.conv2.bias is not None  # the bias bias correction added comes back


@pytest.mark.parametrize("value", [1, 9])
def test_bits_out_of_range_names_the_field(value):
    with pytest.raises(ConfigError, match="AdaRound.bits"):
        AdaRound(bits=value)


def test_bad_advanced_value_names_the_path():
    with pytest.raises(ConfigError, match="AdaRound.advanced.lr"):
        AdaRound.from_dict({"advanced": {"lr": -1}})


@pytest.mark.parametrize("data", [None, []])
def test_missing_or_empty_calibration_data(data):
    with pytest.raises(DataError):
        quantize(SmallCNN(), AdaRound(), data)
