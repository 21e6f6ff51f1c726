import pytest
import torch

from modelpress import TrainConfig
from modelpress.core.errors import ConfigError
from modelpress.core.training import evaluate_accuracy, fit
from modelpress.engine import MethodInputs, run_method
from modelpress.pruning.iterative import IterativePruning, iterative_prune


def layers_of(m):
    return (m.fc1, m.fc2, m.fc3)


def test_each_step_reaches_its_sparsity_and_earlier_zeros_stay(tiny_mlp, toy_data):
    train, test = toy_data
    fit(tiny_mlp, train, TrainConfig(epochs=5, lr=0.01))
    total = sum(m.weight.numel() for m in layers_of(tiny_mlp))
    snapshots = []

    def evaluate(model):  # runs after each step's fine-tune
        snapshots.append([m.weight.detach() == 0 for m in layers_of(model)])
        return evaluate_accuracy(model, test)

    cfg = IterativePruning(steps=[0.3, 0.6, 0.8], keep_first_last=False)
    records = iterative_prune(tiny_mlp, cfg, train, TrainConfig(epochs=1, lr=0.005, optimizer="sgd", momentum=0.9),
                              evaluate=evaluate)
    assert [r["target"] for r in records] == [0.3, 0.6, 0.8]
    for r in records:
        assert r["sparsity"] == round(r["target"] * total) / total
        assert 0 <= r["metric"] <= 1
    for earlier, later in zip(snapshots, snapshots[1:]):
        for e, zero_later in zip(earlier, later):
            assert zero_later[e].all()  # pruned at one step -> still zero after the next fine-tune


@pytest.mark.parametrize("criterion", ["l2", "random", "taylor", "snip"])
def test_registered_method_with_any_criterion(tiny_mlp, toy_data, criterion):
    train, _ = toy_data
    p, report = run_method(tiny_mlp, IterativePruning(steps=[0.4, 0.7], criterion=criterion, ranking="layer",
                                                      batches=2),
                           MethodInputs(data=train, train=TrainConfig(epochs=0.5, lr=0.005)))
    assert report.trained and len(report.info["steps"]) == 2
    assert int((p.fc2.weight == 0).sum()) == round(0.7 * 1024)
    assert int((p.fc1.weight == 0).sum()) == 0  # first and last layer left out by default
    assert report.info["layer_sparsity"] == {"fc2": round(0.7 * 1024) / 1024}


def test_without_training_steps_run_back_to_back(tiny_mlp):
    p, report = run_method(tiny_mlp, IterativePruning(steps=[0.5, 0.9]), MethodInputs())
    assert not report.trained and [s["sparsity"] for s in report.info["steps"]] == [0.5, round(0.9 * 1024) / 1024]
    assert torch.count_nonzero(p.fc2.weight) == 1024 - round(0.9 * 1024)


@pytest.mark.parametrize("steps", [[], [0.5, 0.5], [0.8, 0.4], [0.0, 0.5], [0.5, 1.0]])
def test_bad_steps_are_config_errors(steps):
    with pytest.raises(ConfigError, match="IterativePruning.steps"):
        IterativePruning(steps=steps)
