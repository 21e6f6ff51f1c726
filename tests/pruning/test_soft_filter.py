import pytest
import torch
from torch import nn

from modelpress import Scope, TrainConfig
from modelpress.core.masks import get_mask
from modelpress.core.training import fit
from modelpress.engine import MethodInputs, run_method
from modelpress.pruning.soft_filter import SoftFilterCallback, SoftFilterPruning, filter_norms, select_convs


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 3))


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long() + (x.mean((1, 2, 3)) > 0.1).long()
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 192, 32)]


def test_soft_zeroed_filters_keep_training_and_come_back(images):
    model = conv_net()
    layers = select_convs(model, SoftFilterPruning())
    assert [n for n, _ in layers] == ["2", "4"]  # the first conv is left out by default
    cb = SoftFilterCallback(layers, ratio=0.25, frequency=3)
    norms = {}

    class Probe:  # runs after the soft zeroing of the same step
        def on_step_end(self, step, model):
            norms[step] = {n: filter_norms(m.weight).clone() for n, m in layers}

    fit(model, images, TrainConfig(epochs=2, lr=0.05, optimizer="sgd", momentum=0.9), callbacks=[cb, Probe()])
    step, zeroed = cb.history[0]
    assert step == 2 and all(len(idx) == 2 for idx in zeroed.values())
    for name, idx in zeroed.items():
        assert torch.all(norms[2][name][idx] == 0)  # zeroed at step 2 ...
        assert torch.all(norms[3][name][idx] > 0)   # ... and growing back one step later (no mask)
    assert all(get_mask(m) is None for _, m in layers)


def test_final_cut_is_exact_masked_and_survives_more_training(images):
    model = conv_net()
    p, report = run_method(model, SoftFilterPruning(ratio=0.25, frequency=2),
                           MethodInputs(data=images, train=TrainConfig(epochs=2, lr=0.05, optimizer="sgd")))
    assert report.trained and report.info["soft_rounds"] == 6
    for name in ("2", "4"):
        w = p[int(name)].weight
        cut = report.info["filters_cut"][name]
        assert len(cut) == 2 and torch.all(w[cut] == 0)
        assert int((filter_norms(w) == 0).sum()) == 2
        assert torch.equal(get_mask(p[int(name)])[cut], torch.zeros_like(w[cut]))
    fit(p, images, TrainConfig(epochs=1, lr=0.05, optimizer="sgd", momentum=0.9))
    for name in ("2", "4"):
        assert torch.all(p[int(name)].weight[report.info["filters_cut"][name]] == 0)
    assert filter_norms(model[2].weight).min() > 0  # input model untouched


def test_without_training_only_the_hard_cut_happens():
    model = conv_net()
    p, report = run_method(model, SoftFilterPruning(ratio=0.5, scope=Scope(include=["0", "2"])), MethodInputs())
    assert not report.trained and report.info["soft_rounds"] == 0
    assert int((filter_norms(p[0].weight) == 0).sum()) == 2 and int((filter_norms(p[2].weight) == 0).sum()) == 4
    weakest = filter_norms(model[2].weight).argsort()[:4].sort().values.tolist()
    assert report.info["filters_cut"]["2"] == weakest
    assert filter_norms(p[4].weight).min() > 0
