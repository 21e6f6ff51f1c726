"""Quantization-aware training (quant.qat): STE/LSQ gradients, observers, BN freezing, conversion."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress import TrainConfig, quantize
from modelpress.core.errors import ConfigError, DataError
from modelpress.core.training import evaluate_accuracy, fit
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.modules import QuantConv2d, QuantLinear
from modelpress.quantization.qat import QAT, QATCallback, calibrate, convert_qat, prepare_qat
from modelpress.quantization.weight_only import WeightOnly


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2), 1))


def image_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def test_ste_gradients_reach_weights_and_lsq_scales(tiny_mlp):
    cfg = QAT(weight_bits=4, act_bits=8, observer_steps=0)
    wrapped = prepare_qat(tiny_mlp, cfg)
    x = torch.randn(32, 16)
    calibrate(tiny_mlp, [x], 1)
    for _, fq in wrapped:
        fq.freeze()
    F.cross_entropy(tiny_mlp(x), torch.randint(0, 4, (32,))).backward()
    for name, fq in wrapped:
        assert fq.layer.weight.grad is not None and fq.layer.weight.grad.abs().sum() > 0, name
        assert fq.w_scale.grad is not None and fq.w_scale.grad.abs().sum() > 0, name
        assert fq.act_scale.grad is not None, name


def test_lsq_scales_change_after_a_few_steps(tiny_mlp, toy_data):
    train, _ = toy_data
    cfg = QAT(weight_bits=4, act_bits=8, observer_steps=0)
    wrapped = prepare_qat(tiny_mlp, cfg)
    calibrate(tiny_mlp, train, 1)
    before = {n: (fq.w_scale.detach().clone(), fq.act_scale.detach().clone()) for n, fq in wrapped}
    fit(tiny_mlp, train, TrainConfig(epochs=1, lr=1e-2), callbacks=[QATCallback(cfg)])
    for name, fq in wrapped:
        w0, a0 = before[name]
        assert not torch.equal(fq.w_scale.detach(), w0), name
        assert not torch.equal(fq.act_scale.detach(), a0), name


def test_fixed_scales_do_not_train(tiny_mlp, toy_data):
    train, _ = toy_data
    cfg = QAT(weight_bits=4, act_bits=8, observer_steps=2, learnable_scales=False)
    wrapped = prepare_qat(tiny_mlp, cfg)
    fit(tiny_mlp, train, TrainConfig(epochs=1, lr=1e-2), callbacks=[QATCallback(cfg)])
    for _, fq in wrapped:
        assert not fq.w_scale.requires_grad and fq.w_scale.grad is None


def test_observers_freeze_after_observer_steps(tiny_mlp, toy_data):
    train, _ = toy_data
    cfg = QAT(weight_bits=4, act_bits=8, observer_steps=3)
    wrapped = prepare_qat(tiny_mlp, cfg)
    seen = []

    class Record:
        def on_step_end(self, step, model):
            seen.append((step, [(float(fq.act_lo), float(fq.act_hi), int(fq.act_seen)) for _, fq in wrapped]))

    cb = QATCallback(cfg)
    fit(tiny_mlp, train, TrainConfig(epochs=1, lr=1e-2), callbacks=[cb, Record()])
    assert cb.observers_frozen_at == 3
    counts = [[c for _, _, c in layers] for _, layers in seen]
    assert counts[0] == [1, 1, 1] and counts[2] == [3, 3, 3]
    ranges_at_3 = seen[2][1]
    assert all(layers == ranges_at_3 for _, layers in seen[3:])  # nothing observed after step 3
    assert seen[1][1] != seen[0][1]  # while observing, the moving average moves


def test_bn_running_stats_freeze_after_freeze_bn_after():
    torch.manual_seed(0)
    model = ConvBN()
    cfg = QAT(weight_bits=4, act_bits=8, observer_steps=1, freeze_bn_after=2)
    prepare_qat(model, cfg)
    stats = []

    class Record:
        def on_step_end(self, step, model):
            stats.append(model.bn.running_mean.clone())

    batches = image_batches(6)
    cb = QATCallback(cfg)
    fit(model, batches, TrainConfig(epochs=1, lr=1e-2), callbacks=[cb, Record()])
    assert cb.bn_frozen_at == 2
    assert not torch.equal(stats[0], stats[1])  # steps 0, 1 still update
    assert all(torch.equal(stats[1], s) for s in stats[2:])
    assert model.bn.weight.grad is not None  # the affine part keeps training


def test_converted_model_computes_what_the_qat_model_computes():
    torch.manual_seed(0)
    model = ConvBN()
    batches = image_batches(4)
    cfg = QAT(weight_bits=4, act_bits=8, observer_steps=2, freeze_bn_after=0)
    prepare_qat(model, cfg)
    calibrate(model, batches, 2)
    fit(model, batches, TrainConfig(epochs=2, lr=1e-2), callbacks=[QATCallback(cfg)])
    model.eval()
    x = batches[0][0]
    with torch.no_grad():
        fake = model(x)
        packed = convert_qat(model)(x)
    assert isinstance(model.conv, QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert model.conv.act_bits == 8 and model.conv.qspec.bits == 4
    assert torch.allclose(fake, packed, atol=1e-4)


@pytest.fixture
def trained_task():
    """A 4-class linear-boundary task with 1,024 test points and an MLP trained on it."""
    from tinymodels import TinyMLP

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3072, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    train = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 2048, 128)]
    test = [(x[2048:], y[2048:])]
    torch.manual_seed(0)
    model = fit(TinyMLP(hidden=64), train, TrainConfig(epochs=20, lr=1e-2)).eval()
    return model, train, test


def test_qat_beats_int2_ptq_on_a_tiny_task(trained_task):
    model, train, test = trained_task
    fp32 = evaluate_accuracy(model, test)
    ptq = evaluate_accuracy(quantize(model, WeightOnly(bits=2)), test)
    torch.manual_seed(0)
    q, report = run_method(model, QAT(weight_bits=2, act_bits=None, observer_steps=4),
                           MethodInputs(data=train, train=TrainConfig(epochs=8, lr=3e-3)))
    acc = evaluate_accuracy(q, test)
    assert report.trained and isinstance(q.fc1, QuantLinear) and q.fc1.act_bits is None
    assert fp32 > 0.94
    assert acc > ptq + 0.04, (fp32, ptq, acc)  # measured: 0.950 vs 0.867 (fp32 0.954)
    assert acc > fp32 - 0.02


def test_w4a8_qat_matches_fp32_and_int4_ptq(trained_task):
    model, train, test = trained_task
    fp32 = evaluate_accuracy(model, test)
    ptq = evaluate_accuracy(quantize(model, WeightOnly(bits=4)), test)
    torch.manual_seed(0)
    q = quantize(model, QAT(weight_bits=4, act_bits=8, observer_steps=4), train,
                 train=TrainConfig(epochs=8, lr=3e-3))
    assert q.fc2.act_bits == 8
    acc = evaluate_accuracy(q, test)
    assert acc >= ptq - 0.005 and acc >= fp32 - 0.01, (fp32, ptq, acc)


def test_without_training_it_calibrates_and_converts(tiny_mlp, toy_data):
    train, _ = toy_data
    ref = copy.deepcopy(tiny_mlp).eval()
    q, report = run_method(tiny_mlp, QAT(weight_bits=8, act_bits=8), MethodInputs(data=train))
    assert not report.trained
    x = train[0][0]
    lo, hi = report.info["layers"]["fc1"]["act_range"]
    assert lo < -2 and hi > 2  # a moving average of the batch min / max of Gaussian inputs
    with torch.no_grad():
        err = (q(x) - ref(x)).pow(2).mean() / ref(x).pow(2).mean()
    assert err < 1e-3


@pytest.mark.parametrize("field,value", [("weight_bits", 1), ("weight_bits", 9), ("act_bits", 9)])
def test_bad_bits_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"QAT.{field}"):
        QAT(**{field: value})


def test_needs_data(tiny_mlp):
    with pytest.raises(DataError):
        quantize(tiny_mlp, QAT())
    with pytest.raises(DataError):
        quantize(tiny_mlp, QAT(), [])
