"""Registry-driven contract: every registered method x every tiny zoo model.

A method applies to a model when the model has a layer of one of the method's
``layer_types``; then it must build from its default config, round-trip that config,
apply without touching the input model, keep the output shape, produce no NaN, and meet
its family's floor. Otherwise it must refuse with a ModelpressError, never crash.
"""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from modelpress import apply, list_methods
from modelpress.core.errors import ModelpressError
from modelpress.zoo.models import build_model

ZOO = ["lenet5", "lenet300", "resnet_small", "mobilenetv2_small"]
METHODS = [m for m in list_methods() if m.family != "distill"]  # distillers need a teacher: see tests/distillation
# Defaults, except where a default costs seconds the contract does not need: CP's 100 ALS
# sweeps take ~6 s on resnet_small, AdaRound's 300 steps per layer ~19 s on mobilenetv2_small;
# tests/lowrank, tests/quantization/test_adaround.py and the benchmarks check their quality at the defaults.
FAST = {"lowrank.cp": {"n_iter_max": 10}, "quant.adaround": {"iterations": 60}}


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).mean().item() / noise)


def weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.mark.parametrize("model_name", ZOO)
@pytest.mark.parametrize("info", METHODS, ids=lambda i: i.name)
def test_method_contract(info, model_name):
    cfg = info.config_cls(**FAST.get(info.name, {}))
    assert info.config_cls.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg

    torch.manual_seed(0)
    model = build_model(model_name).eval()
    x = torch.randn(16, 1, 28, 28)
    data = [(x[:8], torch.randint(0, 10, (8,))), (x[8:], torch.randint(0, 10, (8,)))]
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    if info.applicable(model) is not None:  # no layer of its types, or not the structure it needs
        with pytest.raises(ModelpressError):
            apply(model, cfg, data)
        return
    out_model = apply(model, cfg, data).eval()

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was modified"
    with torch.no_grad():
        out = out_model(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()

    if info.family == "prune" and info.structural:
        n_before = sum(p.numel() for p in model.parameters())
        assert sum(p.numel() for p in out_model.parameters()) < n_before
    elif info.family == "prune":
        zeros = lambda ws: sum(int((w == 0).sum()) for w in ws.values())  # noqa: E731
        assert zeros(weights(out_model)) > zeros(weights(model))
    elif info.family in ("quant", "lowrank"):
        assert sqnr_db(ref, out) > 10, f"{info.name} default config loses too much on {model_name}"
