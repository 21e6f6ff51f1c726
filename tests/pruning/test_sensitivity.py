import json

import pytest
import torch
from rich.console import Console
from tinymodels import TinyMLP

from modelpress import MagnitudePruning, Scope, TrainConfig, prune
from modelpress.core.errors import ConfigError
from modelpress.core.training import evaluate_accuracy, fit
from modelpress.pruning.sensitivity import SensitivityConfig, SensitivityResult, sensitivity_scan

SPARSITIES = [0.2, 0.4, 0.6, 0.8, 0.95]


@pytest.fixture(scope="module")
def trained():
    """A TinyMLP trained on a learnable 4-class problem, and 1,024 test samples (smooth curves)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = TinyMLP()
    fit(model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 1024, 64)], TrainConfig(epochs=8, lr=0.01))
    return model.eval(), [(x[1024:], y[1024:])]


@pytest.fixture(scope="module")
def scans(trained):
    model, test = trained
    return {metric: sensitivity_scan(model, test, SensitivityConfig(sparsities=SPARSITIES, metric=metric,
                                                                     keep_first_last=False))
            for metric in ("accuracy", "loss")}


def mean_drop(result, layer):
    return sum(result.drops()[layer]) / len(result.sparsities)


def test_scan_gives_monotone_ish_curves_and_restores_the_model(trained, scans):
    model, test = trained
    acc, loss = scans["accuracy"], scans["loss"]
    assert acc.baseline == pytest.approx(evaluate_accuracy(model, test)) and acc.baseline > 0.9
    assert set(acc.curves) == {"fc1", "fc2", "fc3"} and acc.sizes == {"fc1": 512, "fc2": 1024, "fc3": 128}
    for layer in acc.curves:
        a, lo = acc.curves[layer], loss.curves[layer]
        assert all(b <= prev + 0.01 for prev, b in zip(a, a[1:])), (layer, a)   # accuracy falls
        assert all(b >= prev - 0.01 for prev, b in zip(lo, lo[1:])), (layer, lo)   # loss rises
        assert a[-1] < acc.baseline - 0.02 and lo[-1] > loss.baseline + 0.02     # 95% hurts every layer
    assert all(int((m.weight == 0).sum()) == 0 for m in (model.fc1, model.fc2, model.fc3))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.85])
def test_ratios_meet_the_global_target_exactly(trained, scans, target):
    model, test = trained
    for res in scans.values():
        ratios = res.ratios_for_target(target)
        pruned = sum(round(r * res.sizes[n]) for n, r in ratios.items())
        assert pruned == round(target * sum(res.sizes.values()))
        assert all(0 <= r <= SPARSITIES[-1] for r in ratios.values())
        p = prune(model, MagnitudePruning(sparsity=target, layer_sparsity=ratios, keep_first_last=False))
        assert sum(int((m.weight == 0).sum()) for m in (p.fc1, p.fc2, p.fc3)) == pruned


def test_more_sensitive_layers_get_less_sparsity(scans):
    for res in scans.values():
        ranked = sorted(res.curves, key=lambda n: mean_drop(res, n))
        ratios = res.ratios_for_target(0.5)
        assert ratios[ranked[-1]] < ratios[ranked[0]], (res.metric, ranked, ratios)


def test_allocation_on_known_curves():
    # Same size; "a" loses accuracy fast, "b" barely: b takes the sparsity first.
    res = SensitivityResult(metric="accuracy", baseline=0.9, sparsities=[0.25, 0.5, 0.75],
                            curves={"a": [0.8, 0.6, 0.3], "b": [0.9, 0.89, 0.85]}, sizes={"a": 100, "b": 100})
    assert res.ratios_for_target(0.25) == {"a": 0.0, "b": 0.5}
    assert res.ratios_for_target(0.5) == {"a": 0.25, "b": 0.75}
    with pytest.raises(ConfigError, match="only went up to 75%"):
        res.ratios_for_target(0.8)
    # A noisy bump (accuracy up at 50%) is not read as "pruning helps".
    bumpy = SensitivityResult("accuracy", 0.9, [0.25, 0.5], {"a": [0.7, 0.95], "b": [0.85, 0.8]}, {"a": 10, "b": 10})
    assert bumpy.ratios_for_target(0.25) == {"a": 0.0, "b": 0.5}


def test_table_dict_and_plot(scans, tmp_path):
    res = scans["accuracy"]
    console = Console(record=True, width=200)
    console.print(res.to_table())
    text = console.export_text()
    assert "fc2" in text and "95%" in text and "1,024" in text
    again = SensitivityResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again == res
    path = res.plot(tmp_path / "plots" / "sens.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_scope_and_limits(trained):
    model, test = trained
    res = sensitivity_scan(model, test, SensitivityConfig(sparsities=[0.5], scope=Scope(include=["fc2"]),
                                                          max_batches=1))
    assert list(res.curves) == ["fc2"] and len(res.curves["fc2"]) == 1
    assert list(sensitivity_scan(model, test, SensitivityConfig(sparsities=[0.5])).curves) == ["fc2"]
    with pytest.raises(ConfigError, match="sparsities"):
        SensitivityConfig(sparsities=[0.5, 1.0])
