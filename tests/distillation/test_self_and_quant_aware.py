"""Self-distillation (exit heads taught by the final output) and quantization-aware distillation."""
from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from modelpress import KD, QAT, QuantAwareDistillation, SelfDistillation, TrainConfig, distill
from modelpress.core.errors import ConfigError, DataError
from modelpress.core.training import evaluate_accuracy, fit
from modelpress.distillation.self_distill import ExitHead, auto_exits
from modelpress.engine import MethodInputs, run_method


def digits(images: bool = False):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    return list(zip(x[:1200].split(64), y[:1200].split(64))), [(x[1200:], y[1200:])]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.block3(self.block2(self.block1(x))).mean(dim=(2, 3)))


def test_exit_heads_fit_every_feature_kind():
    for feature, cls in [(torch.zeros(2, 8, 5, 5), nn.Conv2d), (torch.zeros(2, 7, 12), nn.LayerNorm),
                         (torch.zeros(2, 12), nn.Linear)]:
        head = ExitHead(feature, 4)
        assert head(feature).shape == (2, 4)
        assert any(isinstance(m, cls) for m in head.modules())
    with pytest.raises(DataError, match="cannot attach an exit"):
        ExitHead(torch.zeros(2, 3, 4, 5, 6), 4)


def test_auto_exits_skip_the_classifier_and_the_block_feeding_it():
    assert auto_exits(SmallCNN(), torch.zeros(2, 1, 8, 8), num_exits=3) == ["block1", "block2"]
    assert auto_exits(SmallCNN(), torch.zeros(2, 1, 8, 8), num_exits=1) == ["block1"]


def test_self_distillation_trains_the_network_and_drops_the_heads():
    torch.manual_seed(0)
    train, test = digits(images=True)
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = run_method(model, SelfDistillation(T=3.0, alpha=0.5),
                             MethodInputs(data=train, train=TrainConfig(epochs=6, lr=1e-2)))
    assert report.info["exits"] == ["block1", "block2"] and report.info["head_params"] > 0
    assert set(out.state_dict()) == set(before)  # same architecture, no head left behind
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the input is untouched
    assert evaluate_accuracy(out, test) >= 0.90


def test_self_distillation_errors_name_the_problem():
    train, _ = digits(images=True)
    with pytest.raises(ConfigError, match="block9"):
        distill(SmallCNN(), SelfDistillation(exits=["block9"]), train, train=TrainConfig(epochs=1))
    with pytest.raises(DataError, match="needs labels"):
        distill(SmallCNN(), SelfDistillation(), [x for x, _ in train], train=TrainConfig(epochs=1))


def _trained_mlp(train):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return fit(net, train, TrainConfig(epochs=8, lr=5e-3))


def test_quant_aware_distillation_keeps_the_float_teacher_and_matches_qat():
    train, test = digits()
    net = _trained_mlp(train)
    float_acc = evaluate_accuracy(net, test)
    snapshot = copy.deepcopy(net.state_dict())
    qcfg = QAT(weight_bits=3, act_bits=8, observer_steps=5)
    qad, report = run_method(net, QuantAwareDistillation(quant=qcfg, kd=KD(T=2.0, alpha=0.7)),
                             MethodInputs(data=train, train=TrainConfig(epochs=3, lr=1e-3)))
    assert type(qad[0]).__name__ == "QuantLinear" and qad[0].qspec.bits == 3
    assert report.info["teacher"] == "float model" and "layers" in report.info
    assert all(torch.equal(net.state_dict()[k], v) for k, v in snapshot.items())
    qad_acc = evaluate_accuracy(qad, test)
    assert qad_acc >= float_acc - 0.03


def test_quant_aware_distillation_trains_on_unlabelled_batches():
    train, test = digits()
    net = _trained_mlp(train)
    qad = distill(net, QuantAwareDistillation(quant=QAT(weight_bits=4, observer_steps=5)), [x for x, _ in train],
                  train=TrainConfig(epochs=2, lr=1e-3))
    assert evaluate_accuracy(qad, test) >= evaluate_accuracy(net, test) - 0.03
    with pytest.raises(DataError, match="distill.qat needs data"):
        distill(net, QuantAwareDistillation(), None, train=TrainConfig(epochs=1))


def test_relational_term_is_zero_for_identical_outputs_and_positive_otherwise():
    from modelpress.distillation.kd import distillation_loss

    teacher = nn.Linear(6, 3)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    kd_only = distillation_loss(teacher, KD(T=2.0, alpha=1.0))
    with_rkd = distillation_loss(teacher, KD(T=2.0, alpha=1.0, relational_weight=1.0))
    same = copy.deepcopy(teacher)
    assert with_rkd(same, x, y).item() == pytest.approx(kd_only(same, x, y).item(), abs=1e-6)
    other = nn.Linear(6, 3)
    assert with_rkd(other, x, y).item() > kd_only(other, x, y).item()
    with pytest.raises(ConfigError, match="teacher is the model being trained"):
        kd_only(teacher, x, y)


class FeaturesNet(nn.Module):
    """torchvision's EfficientNet/MobileNet form: one `features` Sequential, then pool and classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*[nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.ReLU())
                                        for i in range(4)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_auto_exits_look_inside_the_block_list_when_the_top_level_has_none():
    x = torch.randn(2, 3, 8, 8)
    assert auto_exits(FeaturesNet(), x, 3) == ["features.0", "features.1", "features.2"]

    class TokenLogits(nn.Module):  # a language model's [batch, tokens, vocab]: no classification exits
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with pytest.raises(DataError, match=r"expects classifier logits \(B, classes\)"):
        auto_exits(TokenLogits(), torch.randn(2, 6, 4), 3)
