import pytest
import torch

from modelpress import MagnitudePruning, Polynomial, Scope, TrainConfig, prune
from modelpress.core.errors import ScopeError
from modelpress.core.masks import has_masks, strip_masks
from modelpress.core.training import evaluate_accuracy, fit
from modelpress.pruning.schedules import Constant, OneShot


def zero_frac(t):
    return float((t == 0).float().mean())


def test_layer_ranking_reaches_exact_sparsity_per_layer(tiny_mlp):
    p = prune(tiny_mlp, MagnitudePruning(sparsity=0.7, ranking="layer", keep_first_last=False))
    for lin in (p.fc1, p.fc2, p.fc3):
        assert int((lin.weight == 0).sum()) == round(0.7 * lin.weight.numel())
    assert zero_frac(tiny_mlp.fc1.weight) == 0.0  # input model untouched


def test_global_ranking_uses_one_threshold(tiny_mlp):
    with torch.no_grad():
        tiny_mlp.fc2.weight.mul_(0.01)  # fc2 is far smaller: global pruning empties it first
    p = prune(tiny_mlp, MagnitudePruning(sparsity=0.65, keep_first_last=False))
    total = sum(m.weight.numel() for m in (p.fc1, p.fc2, p.fc3))
    zeros = sum(int((m.weight == 0).sum()) for m in (p.fc1, p.fc2, p.fc3))
    assert zeros == round(0.65 * total)  # 1082 > 1024 weights of fc2
    assert zero_frac(p.fc2.weight) == 1.0


def test_first_last_kept_by_default_and_overrides(tiny_mlp):
    p = prune(tiny_mlp, MagnitudePruning(sparsity=0.5))
    assert zero_frac(p.fc1.weight) == 0 and zero_frac(p.fc3.weight) == 0 and zero_frac(p.fc2.weight) == 0.5
    p = prune(tiny_mlp, MagnitudePruning(sparsity=0.5, scope=Scope(include=["fc1", "fc2"]),
                                         layer_sparsity={"fc1": 0.25}))
    assert zero_frac(p.fc1.weight) == 0.25 and zero_frac(p.fc2.weight) == 0.5


def test_bad_scope_and_override_names(tiny_mlp):
    with pytest.raises(ScopeError):
        prune(tiny_mlp, MagnitudePruning(scope=Scope(include=["fc9"])))
    with pytest.raises(ScopeError, match="layer_sparsity names 'fc1'"):
        prune(tiny_mlp, MagnitudePruning(layer_sparsity={"fc1": 0.2}))  # fc1 is excluded by default


def test_masks_keep_weights_zero_through_momentum_training(tiny_mlp, toy_data):
    train, _ = toy_data
    p = prune(tiny_mlp, MagnitudePruning(sparsity=0.8, ranking="layer", keep_first_last=False))
    before = [m.weight == 0 for m in (p.fc1, p.fc2, p.fc3)]
    fit(p, train, TrainConfig(epochs=3, lr=0.05, optimizer="sgd", momentum=0.9))
    for zero, m in zip(before, (p.fc1, p.fc2, p.fc3)):
        assert torch.all(m.weight[zero] == 0)
    strip_masks(p)
    assert not has_masks(p) and zero_frac(p.fc2.weight) == pytest.approx(0.8, abs=1e-3)


def test_agp_schedule_hits_each_scheduled_sparsity_exactly(tiny_mlp, toy_data):
    train, test = toy_data
    sched = Polynomial(initial_sparsity=0.0, begin_step=0, end_step=12, frequency=4)
    seen = {}

    class Probe:
        def on_step_end(self, step, model):
            seen[step] = zero_frac(model.fc2.weight)

    from modelpress.pruning.magnitude import _ScheduleCallback, select_layers
    cfg = MagnitudePruning(sparsity=0.9, schedule=sched, ranking="layer")
    model = tiny_mlp
    cb = _ScheduleCallback(select_layers(model, cfg), cfg, sched.resolve(18))
    fit(model, train, TrainConfig(epochs=3, lr=0.01), callbacks=[cb, Probe()])
    n = model.fc2.weight.numel()
    for step in (0, 4, 8, 12):
        assert seen[step] == round(sched.sparsity_at(step, 0.9) * n) / n
    assert seen[17] == round(0.9 * n) / n  # held after the schedule ends


def test_scheduled_prune_with_training_keeps_accuracy(tiny_mlp, toy_data):
    train, test = toy_data
    fit(tiny_mlp, train, TrainConfig(epochs=10, lr=0.01))
    base = evaluate_accuracy(tiny_mlp, test)
    p = prune(tiny_mlp, MagnitudePruning(sparsity=0.5, schedule=Polynomial(frequency=2)), train,
              train=TrainConfig(epochs=5, lr=0.005))
    assert zero_frac(p.fc2.weight) == 0.5
    assert evaluate_accuracy(p, test) >= base - 0.05


def test_schedules_definitions():
    assert OneShot().sparsity_at(0, 0.8) == 0.8 and OneShot().sparsity_at(1, 0.8) is None
    c = Constant(begin_step=10, frequency=5)
    assert [c.sparsity_at(s, 0.5) for s in (9, 10, 12, 15)] == [None, 0.5, None, 0.5]
    p = Polynomial(initial_sparsity=0.2, begin_step=10, end_step=20, frequency=5, power=1)
    assert p.sparsity_at(15, 0.6) == pytest.approx(0.4) and p.sparsity_at(20, 0.6) == 0.6
    assert p.sparsity_at(21, 0.6) is None
    assert Polynomial(end_fraction=0.5).resolve(100).end_step == 49
    with pytest.raises(Exception, match="end_step"):
        Polynomial(begin_step=5, end_step=5)
