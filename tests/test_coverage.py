"""Coverage matrix in CI: representative methods x tiny variants of every model family.

``benchmarks/coverage.py`` runs every registered method on real architectures (torchvision,
timm, Hugging Face families, ``nn.TransformerEncoderLayer`` / LSTM / GRU models) in minutes to
hours; this runs a representative subset of the methods on a tiny variant of each family (32 px
images, Hugging Face configs 32-64 wide with 2 layers) in-process, with the same data, configs
and inputs. A method may refuse a model, but only with a ``ModelpressError``; what it returns must
run on the same input with the original output shape and finite values.

Combinations failing today with a raw exception are strict xfails (:data:`KNOWN_RAW`): when one is
fixed, its xfail fails, and the mark should go.
"""
from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from modelpress.core.data import call_model
from modelpress.core.errors import ModelpressError
from modelpress.engine import run_method

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_coverage():
    """benchmarks/coverage.py (not part of the package), imported by path under a name of its own:
    on sys.path as ``coverage`` it would clash with coverage.py, the measuring tool."""
    name = "coverage_matrix"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "coverage.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


cov = load_coverage()

# One or two methods of each family, the ones whose code paths differ most: unstructured and
# structured pruning, head pruning, gradient-based importance (needs a loss), post-training
# dynamic / static / weight-only quantization, quantization-aware training, low rank for Linear
# and for Conv2d, offline and online distillation, a shallower student, layer-by-layer calibration
# (GPTQ, SparseGPT), scales folded into the producing op (AWQ, SmoothQuant).
METHODS = ("prune.magnitude", "prune.channels", "prune.heads", "prune.taylor", "quant.dynamic_int8",
           "quant.static_int8", "quant.weight_only", "quant.qat", "lowrank.svd", "lowrank.cp", "distill.kd",
           "distill.mutual", "distill.shallow", "quant.gptq", "prune.sparsegpt", "quant.awq", "quant.smoothquant")
# Left out on purpose: CP at its default param_ratio on ResNet-18 (512x512 3x3 convs get a rank
# above the tensor's sizes: ~35 s of ALS), GPTQ / SparseGPT on ResNet-18 (a 4608 x 4608 Hessian per
# 512-channel 3x3 conv: 40-80 s); benchmarks/coverage.py shows them.
TOO_SLOW = {("lowrank.cp", "torchvision:resnet18"), ("quant.gptq", "torchvision:resnet18"),
            ("prune.sparsegpt", "torchvision:resnet18")}

KNOWN_RAW: dict[tuple[str, str], str] = {}

LIBRARY = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers", "nn": None}


def cases():
    for spec in cov.tiny_catalog():
        for method in METHODS:
            if (method, spec.name) in TOO_SLOW:
                continue
            reason = KNOWN_RAW.get((method, spec.name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(spec, method, id=f"{method}-{spec.name}", marks=marks)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("coverage")


@lru_cache(maxsize=None)
def tiny_model(spec, workdir: Path):
    """One model (and its data) per spec and process; run_method leaves the input model as it is."""
    model = cov.build_model(spec, workdir).eval()
    batches = cov.make_batches(spec, model, 32)
    return model, batches


@pytest.mark.parametrize(("spec", "method"), list(cases()))
def test_method_on_tiny_variant(spec, method, workdir):
    if LIBRARY[spec.family]:
        pytest.importorskip(LIBRARY[spec.family])
    model, batches = tiny_model(spec, workdir)
    example = cov.example_of(batches, 2)
    with torch.no_grad():
        ref = cov.first_tensor(call_model(model, example))
    info, cfg = cov.method_config(method)
    try:
        out_model, _ = run_method(model, cfg, cov.method_inputs(spec, info, batches, model), seed=0)
    except ModelpressError as err:  # refused on purpose: one line saying why
        assert str(err) and "\n" not in str(err)
        return
    with torch.no_grad():
        out = cov.first_tensor(call_model(out_model, example))
    assert out.shape == ref.shape, f"{method} changed the output shape of {spec.name}"
    assert torch.isfinite(out).all(), f"{method} made {spec.name} output NaN/Inf"


def test_catalog_covers_the_issue():
    """The full matrix spans what issue 15 asks for (names only: nothing is built here)."""
    assert len(cov.TIMM_MODELS) >= 30
    assert {"bert", "distilbert", "roberta", "albert", "vit", "swin", "gpt2", "llama", "qwen2", "mistral",
            "phi"} <= set(cov.HF_FAMILIES)
    gqa = [k for k, v in cov.HF_FAMILIES.items()
           if v[3].get("num_key_value_heads", 0) and v[3]["num_key_value_heads"] < v[3]["num_attention_heads"]]
    assert {"llama", "qwen2", "mistral"} <= set(gqa)
    assert {s.name for s in cov.nn_specs()} == {"nn:transformer", "nn:transformer-prenorm", "nn:lstm", "nn:gru"}
    registered = {m.name for m in cov.list_methods()}
    assert registered <= set(cov.METHOD_CONFIGS), "a new method needs its row in METHOD_CONFIGS"
