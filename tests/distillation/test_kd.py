"""distill.kd: config, frozen teachers, hints, multi-teacher, and a student that learns from a teacher."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn

from modelpress import distill, get_method
from modelpress.core.errors import ConfigError, DataError
from modelpress.core.training import TrainConfig, evaluate_accuracy, fit
from modelpress.distillation.kd import KD, distill_from
from modelpress.tasks import SentenceEmbedding
from modelpress.zoo.models import build_model

QUICK = TrainConfig(epochs=1, lr=1e-3, batch_size=8)


def mlp(*widths):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.fixture
def images():
    x = torch.randn(16, 1, 28, 28)
    return [(x[:8], torch.randint(0, 10, (8,))), (x[8:], torch.randint(0, 10, (8,)))]


def test_registered_and_config_round_trip():
    info = get_method("distill.kd")
    assert info.config_cls is KD and info.needs_data and info.needs_training
    cfg = KD(teacher=["a.safetensors", "b.safetensors"], weights=[1, 2], hints=[("fc1", "fc2")], T=2.0)
    assert KD.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    for bad in ({"T": 0}, {"alpha": 1.5}, {"weights": [-1.0, 2.0]}, {"loss": "l1"}):
        with pytest.raises(ConfigError):
            KD(**bad)


def test_teacher_frozen_no_grads_and_restored(images, monkeypatch):
    teacher, student = build_model("lenet5"), build_model("lenet300")
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    seen = []

    class Spy:  # runs inside fit: the teacher is frozen while the student trains
        def on_step_end(self, step, model):
            seen.append((teacher.training, any(p.requires_grad for p in teacher.parameters()),
                         all(p.grad is None for p in teacher.parameters())))

    from modelpress.engine import inputs as inputs_module  # distillation trains through MethodInputs.fit
    monkeypatch.setattr(inputs_module, "fit", lambda *a, **k: fit(*a, **{**k, "callbacks": [Spy()]}))
    out = distill_from(student, teacher, images, KD(hints=[("fc2", "fc2")]), train=QUICK)
    assert seen and all(s == (False, False, True) for s in seen)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # restored
    assert not any(torch.equal(a, b) for a, b in zip(out.parameters(), student.parameters()))  # trained copy


def test_teacher_from_config_reference(images, tmp_path):
    from modelpress.artifact.checkpoint import save_artifact

    teacher = build_model("lenet5")
    path = tmp_path / "teacher.safetensors"
    save_artifact(teacher, path)
    out = distill(build_model("lenet300"), KD(teacher=str(path)), images, train=QUICK)
    assert out(images[0][0]).shape == (8, 10)
    with pytest.raises(ConfigError, match="no teacher"):
        distill(build_model("lenet300"), KD(), images, train=QUICK)


def test_hint_on_missing_layer_names_close_layers(images):
    with pytest.raises(ConfigError, match="fc_2") as err:
        distill_from(build_model("lenet300"), build_model("lenet5"), images, KD(hints=[("fc_2", "fc2")]), QUICK)
    assert "fc2" in err.value.hint
    with pytest.raises(ConfigError, match="teacher has no layer 'conv9'"):
        distill_from(build_model("lenet300"), build_model("lenet5"), images, KD(hints=[("fc2", "conv9")]), QUICK)


def test_hint_adapters_conv_and_attention(images):
    teacher, student = build_model("resnet_small"), build_model("resnet_small", width=0.5)
    for hint_loss in ("fitnet", "attention"):
        out = distill_from(student, teacher, images, KD(hints=[("layer2", "layer2"), ("layer3", "layer3")],
                                                        hint_loss=hint_loss), QUICK)
        assert torch.isfinite(out(images[0][0])).all()
        assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in student.parameters())


def test_mismatched_logits_raise(images):
    with pytest.raises(DataError, match=r"\(8, 10\).*\(8, 3\)"):
        distill_from(build_model("lenet300"), build_model("lenet5", num_classes=3), images, KD(), QUICK)
    with pytest.raises(ConfigError, match="2 weights for 1 teachers"):
        distill_from(build_model("lenet300"), build_model("lenet5"), images, KD(weights=[1, 1]), QUICK)


def test_multi_teacher_weights_select_the_teacher():
    # A student distilled from two teachers with weights (1, 0) matches the first one.
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    t1, t2 = mlp(8, 32, 4), mlp(8, 32, 4)
    cfg = KD(T=1.0, alpha=1.0, weights=[1.0, 0.0])
    student = distill_from(mlp(8, 64, 4), [t1, t2], [x[i:i + 32] for i in range(0, 256, 32)], cfg,
                           TrainConfig(epochs=60, lr=1e-2))
    with torch.no_grad():
        agree = lambda t: float((student(x).argmax(1) == t(x).argmax(1)).float().mean())  # noqa: E731
    assert agree(t1) > 0.9 and agree(t1) > agree(t2) + 0.3


def test_embedding_loss_pulls_student_to_teacher():
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    teacher, student = mlp(8, 32, 16), mlp(8, 64, 16)
    data = [x[i:i + 32] for i in range(0, 128, 32)]
    cos = lambda m: float(torch.cosine_similarity(m(x), teacher(x), dim=1).mean())  # noqa: E731
    with torch.no_grad():
        start = cos(student)
    out = distill_from(student, teacher, data, KD(loss="embedding_cosine"), TrainConfig(epochs=30, lr=1e-2),
                       task=SentenceEmbedding())
    with torch.no_grad():
        assert cos(out) > max(0.9, start + 0.3)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    teacher = fit(mlp(64, 256, 256, 10), [(x[i:i + 64], y[i:i + 64]) for i in range(0, 1300, 64)],
                  TrainConfig(epochs=30, lr=3e-3))
    return x, y, teacher


def test_distilled_student_matches_hard_labels_on_same_data(digits):
    x, y, teacher = digits
    test = [(x[1300:], y[1300:])]
    assert evaluate_accuracy(teacher, test) > 0.95
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 1300, 32)]
    tc = TrainConfig(epochs=15, lr=1e-2)
    torch.manual_seed(1)
    s0 = mlp(64, 16, 10)
    hard = evaluate_accuracy(fit(copy.deepcopy(s0), train, tc), test)
    soft = evaluate_accuracy(distill_from(s0, teacher, train, KD(T=4.0, alpha=0.9), tc), test)
    assert soft >= hard - 0.01, (soft, hard)


def test_distilled_student_beats_hard_labels_with_unlabelled_transfer_set(digits):
    # 160 labelled digits; the distilled student also sees 1,140 unlabelled ones through the teacher.
    x, y, teacher = digits
    test = [(x[1300:], y[1300:])]
    labelled = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 160, 32)]
    unlabelled = [x[i:i + 32] for i in range(160, 1300, 32)]
    torch.manual_seed(1)
    s0 = mlp(64, 16, 10)
    hard = evaluate_accuracy(fit(copy.deepcopy(s0), labelled, TrainConfig(epochs=40, lr=1e-2)), test)
    soft = evaluate_accuracy(distill_from(s0, teacher, labelled + unlabelled, KD(T=4.0, alpha=0.9),
                                          TrainConfig(epochs=10, lr=1e-2)), test)
    assert soft > hard + 0.02, (soft, hard)
