"""Deep mutual learning: both students learn, each gets gradients from the other's predictions."""
from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from modelpress.core.errors import DataError
from modelpress.core.training import TrainConfig, evaluate_accuracy
from modelpress.distillation.mutual import MutualLearning, _Pair, fresh_copy, mutual_learning, mutual_loss
from modelpress.engine import MethodInputs, run_method


def mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return list(zip(x[:1200].split(64), y[:1200].split(64))), [(x[1200:], y[1200:])]


def test_identical_students_have_zero_mutual_term_and_peers_get_fresh_weights():
    torch.manual_seed(0)
    a = mlp()
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    same = mutual_loss(_Pair(a, a), x, y, T=2.0, weight=1.0)
    ce = 2 * nn.functional.cross_entropy(a(x), y)
    assert same.item() == pytest.approx(ce.item(), abs=1e-6)
    peer = fresh_copy(a, seed=1)
    assert not torch.equal(peer[0].weight, a[0].weight)


def test_both_students_learn_digits_and_the_verb_returns_a_copy():
    torch.manual_seed(0)
    train, test = digits()
    student = mlp()
    before = student[0].weight.clone()
    out, report = run_method(student, MutualLearning(T=2.0),
                             MethodInputs(data=train, train=TrainConfig(epochs=15, lr=5e-3)))
    assert torch.equal(student[0].weight, before)  # the input model is untouched
    acc, peer_acc = evaluate_accuracy(out, test), evaluate_accuracy(report.info["peer"], test)
    assert acc > 0.87 and peer_acc > 0.87, (acc, peer_acc)
    assert not torch.equal(out[0].weight, report.info["peer"][0].weight)


def test_gradients_reach_both_students_and_labels_are_required():
    a, b = mlp(), fresh_copy(mlp(), 3)
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    mutual_loss(_Pair(a, b), x, y, 1.0, 1.0).backward()
    assert a[0].weight.grad.abs().sum() > 0 and b[0].weight.grad.abs().sum() > 0
    with pytest.raises(DataError, match="labelled"):
        mutual_learning(mlp(), None, [torch.randn(4, 64)], MutualLearning(), TrainConfig(max_steps=1))
    with pytest.raises(DataError, match="shape"):
        mutual_loss(_Pair(a, nn.Linear(64, 3)), x, y, 1.0, 1.0)


def test_peer_never_duplicates_the_student_even_with_the_same_seed():
    torch.manual_seed(1)
    student = mlp()
    peer = fresh_copy(student, seed=1)
    assert not torch.equal(peer[0].weight, student[0].weight)
