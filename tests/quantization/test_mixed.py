"""Mixed-precision bit allocation under a byte budget (quant.mixed_precision)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress import TrainConfig, quantize
from modelpress.core.errors import ConfigError, DataError
from modelpress.core.training import fit
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.mixed import MixedPrecision, allocate, fp32_weight_bytes
from modelpress.quantization.modules import QuantLinear, packed_weight_bytes, quantized_weight_bytes, weight_spec


class TwoBranches(nn.Module):
    """Two equally sized branches; the output weighs ``loud`` 30x more than ``quiet`` (planted)."""

    def __init__(self):
        super().__init__()
        self.loud = nn.Linear(32, 32)
        self.quiet = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(3.0 * self.loud(x) + 0.1 * self.quiet(x))


def batches(n=4, d=32, classes=4, seed=0, labels=True):
    """A learnable task: the label is the argmax of a fixed random projection."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, classes, generator=torch.Generator().manual_seed(123))
    out = []
    for _ in range(n):
        x = torch.randn(64, d, generator=g)
        out.append((x, (x @ proj).argmax(1)) if labels else x)
    return out


def trained(model, d):
    # "loss increase" is meaningful at a minimum of the loss: on an untrained model
    # quantization noise lowers the loss as often as it raises it
    torch.manual_seed(0)
    return fit(model, batches(16, d=d, seed=1), TrainConfig(epochs=10, lr=1e-2)).eval()


def cost(shape, bits):
    return quantized_weight_bytes(shape, weight_spec(bits))


@pytest.mark.parametrize("sensitivity", ["loss", "hessian"])
def test_more_sensitive_layer_gets_more_bits(sensitivity):
    model = trained(TwoBranches(), 32)
    # room for one branch at 8 bits and the other at 2, the head at 8 (or both branches at 4)
    budget = cost((32, 32), 8) + cost((32, 32), 2) + cost((4, 32), 8)
    q, report = run_method(model, MixedPrecision(budget_bytes=budget, sensitivity=sensitivity),
                           MethodInputs(data=batches()))
    rows = {r["layer"]: r for r in report.info["layers"]}
    assert rows["loud"]["bits"] >= rows["quiet"]["bits"]
    assert rows["loud"]["bits"] == 8 and rows["quiet"]["bits"] == 2
    for b in (2, 4, 8):
        assert rows["loud"]["sensitivity"][b] > rows["quiet"]["sensitivity"][b]
    assert packed_weight_bytes(q) <= budget
    assert isinstance(q.loud, QuantLinear) and q.loud.qspec.bits == 8 and q.quiet.qspec.bits == 2


@pytest.mark.parametrize("ratio", [0.11, 1 / 6, 0.25])
def test_ratio_budget_is_met(ratio, tiny_mlp):
    q, report = run_method(tiny_mlp, MixedPrecision(budget_ratio=ratio), MethodInputs(data=batches(d=16)))
    budget = int(ratio * fp32_weight_bytes(tiny_mlp))
    assert report.info["budget_bytes"] == budget
    assert packed_weight_bytes(q) == report.info["weight_bytes"] <= budget
    # the allocation uses the budget: one more step up for any layer would not fit
    rows = report.info["layers"]
    for r in rows:
        higher = [b for b in (2, 4, 8) if b > r["bits"]]
        if higher:
            shape = tuple(dict(tiny_mlp.named_modules())[r["layer"]].weight.shape)
            assert report.info["weight_bytes"] - r["bytes"] + cost(shape, higher[0]) > budget or \
                r["sensitivity"][higher[0]] >= r["sensitivity"][r["bits"]]


def test_exact_byte_budget_with_layers_outside_the_scope(tiny_mlp):
    budget = 4 * 16 * 32 + 1500  # fc1 stays fp32 (excluded), the rest must fit in 1,500 bytes
    q, report = run_method(tiny_mlp, MixedPrecision(budget_bytes=budget, scope={"exclude": ["fc1"]}),
                           MethodInputs(data=batches(d=16)))
    assert type(q.fc1) is nn.Linear
    assert 4 * q.fc1.weight.numel() + packed_weight_bytes(q) <= budget


def test_impossible_budget_says_the_smallest_reachable_size(tiny_mlp):
    smallest = cost((32, 16), 2) + cost((32, 32), 2) + cost((4, 32), 2)
    with pytest.raises(ConfigError, match=f"smallest reachable size, {smallest:,} bytes") as err:
        quantize(tiny_mlp, MixedPrecision(budget_bytes=smallest - 1), batches(d=16))
    assert "MixedPrecision.budget_bytes" in str(err.value) and err.value.hint
    quantize(tiny_mlp, MixedPrecision(budget_bytes=smallest), batches(d=16))  # exactly reachable works


def test_unlabelled_calibration_data_uses_output_error(tiny_mlp):
    _, report = run_method(tiny_mlp, MixedPrecision(budget_ratio=0.15), MethodInputs(data=batches(d=16, labels=False)))
    assert all(r["sensitivity"][2] > 0 for r in report.info["layers"])


def test_allocate_is_optimal_on_a_small_case():
    costs = [{2: 10, 4: 20, 8: 40}, {2: 10, 4: 20, 8: 40}, {2: 5, 4: 10, 8: 20}]
    sens = [{2: 9.0, 4: 1.0, 8: 0.0}, {2: 3.0, 4: 0.5, 8: 0.0}, {2: 4.0, 4: 2.0, 8: 0.0}]
    import itertools
    best = min((sum(s[b] for s, b in zip(sens, bits)), bits) for bits in itertools.product((2, 4, 8), repeat=3)
               if sum(c[b] for c, b in zip(costs, bits)) <= 60)
    assert allocate(costs, sens, 60) == list(best[1])
    assert allocate(costs, sens, 24) is None
    assert allocate(costs, sens, 1000) == [8, 8, 8]


@pytest.mark.parametrize("kwargs,field", [({"candidate_bits": [1, 4]}, "candidate_bits"),
                                          ({"candidate_bits": [4, 9]}, "candidate_bits"),
                                          ({"budget_ratio": 1.5}, "budget_ratio"),
                                          ({"budget_bytes": 10, "budget_ratio": 0.2}, "MixedPrecision")])
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        MixedPrecision(**kwargs)


def test_needs_data(tiny_mlp):
    with pytest.raises(DataError):
        quantize(tiny_mlp, MixedPrecision())


def test_loss_against_labels(tiny_mlp):
    _, report = run_method(tiny_mlp, MixedPrecision(budget_ratio=0.2, loss_against="labels"),
                           MethodInputs(data=batches(d=16)))
    assert report.info["weight_bytes"] <= report.info["budget_bytes"] and len(report.info["layers"]) == 3
    with pytest.raises(DataError, match="labelled"):
        quantize(tiny_mlp, MixedPrecision(loss_against="labels"), batches(d=16, labels=False))
