"""quant.gptq: second-order weight-only quantization beats round-to-nearest, and deploys like it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import DataError
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.gptq import GPTQ
from modelpress.quantization.modules import QuantConv2d, QuantLinear
from modelpress.quantization.weight_only import WeightOnly


def correlated_mlp(seed=0):
    """An MLP and inputs with correlated features (real activations are): where GPTQ's update pays."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    mix = torch.randn(128, 128, generator=g) / 11
    batches = [torch.randn(64, 128, generator=g) @ mix + torch.randn(128, generator=g) for _ in range(6)]
    return net, batches


def rel_error(model, ref_model, x):
    with torch.no_grad():
        ref = ref_model(x)
        return float((model(x) - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("bits,granularity,act_order,symmetric", [
    (4, "group", True, True), (4, "group", False, True), (3, "channel", True, True), (4, "group", True, False),
    (2, "channel", False, False)], ids=["w4g32", "w4g32-no-act-order", "w3-channel", "w4g32-asym", "w2-asym"])
def test_gptq_output_error_at_most_half_of_rtn(bits, granularity, act_order, symmetric):
    net, batches = correlated_mlp()
    x = torch.cat(batches)
    common = dict(bits=bits, granularity=granularity, group_size=32, symmetric=symmetric)
    rtn, _ = run_method(net, WeightOnly(**common))
    q, report = run_method(net, GPTQ(act_order=act_order, **common), MethodInputs(data=batches))
    assert rel_error(q, net, x) < 0.5 * rel_error(rtn, net, x)
    layers = report.info["layers"]
    assert set(layers) == {"0", "2", "4"}
    assert all(row["error_vs_rtn"] < 1 for row in layers.values())
    assert all(isinstance(q[i], QuantLinear) and q[i].qspec.bits == bits for i in (0, 2, 4))
    assert all(q[i].qspec.granularity == granularity and q[i].qspec.symmetric == symmetric for i in (0, 2, 4))


def test_gptq_integers_in_range_and_artifact_reloads_bit_exact(tmp_path):
    net, batches = correlated_mlp(1)
    q, _ = run_method(net, GPTQ(bits=4, group_size=32), MethodInputs(data=batches))
    for i in (0, 2, 4):
        w = q[i].weight
        scale = q[i].scale.reshape(w.shape[0], -1)
        ints = (w.reshape(w.shape[0], -1, 32) / scale[..., None]).round()
        assert ints.min() >= -8 and ints.max() <= 7  # every dequantized weight is an int4 step
        assert torch.allclose(ints * scale[..., None], w.reshape(w.shape[0], -1, 32), atol=1e-6)
    path = save_artifact(q, tmp_path / "q.safetensors")
    again, header = load_artifact(path, base_model=correlated_mlp(1)[0])
    assert header["structure"]["0"]["class"] == "QuantLinear"
    x = torch.cat(batches)
    assert torch.equal(again(x), q(x))
    # 4 bits per weight + one fp32 scale per 32 weights
    assert q[0].qweight.numel() == 128 * 128 // 2 and q[0].scale.numel() == 128 * 128 // 32


def test_gptq_on_convs_dead_inputs_and_group_fallback():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 36, 10)).eval()
    batches = [torch.randn(8, 3, 6, 6) for _ in range(4)]
    for b in batches:
        b[:, 2] = 0  # an input channel that is always zero: its Hessian rows are zero
    rtn, _ = run_method(net, WeightOnly(bits=4, granularity="group", group_size=16))
    q, report = run_method(net, GPTQ(bits=4, group_size=16), MethodInputs(data=batches))
    assert isinstance(q[0], QuantConv2d) and isinstance(q[2], QuantConv2d)
    assert report.info["fallback"] == ["0"]  # 3 * 9 = 27 inputs: per-channel scales
    x = torch.cat(batches)
    assert rel_error(q, net, x) < rel_error(rtn, net, x)
    assert torch.isfinite(q(x)).all()


def test_gptq_on_gpt2_conv1d_and_llama_gqa():
    from modelpress.artifact.hf import HFLogits, import_transformers
    from tests.tinymodels import tiny_gpt2

    transformers = import_transformers()
    llama = HFLogits(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))).eval()
    torch.manual_seed(0)
    for model, n_linear in ((tiny_gpt2().eval(), 9), (llama, 15)):
        batches = [torch.randint(0, 100, (4, 16)) for _ in range(3)]
        q, report = run_method(model, GPTQ(bits=4, group_size=32), MethodInputs(data=batches))
        assert len(report.info["layers"]) == n_linear, report.info.get("skipped")
        rtn, _ = run_method(model, WeightOnly(bits=4, granularity="group", group_size=32))
        x = batches[0]
        # what GPTQ minimizes, each layer's output error on its calibration inputs, is below RTN's in most
        # layers; end to end these 32-64 wide random models land within 10% of RTN (real weights: benchmarks/llm.py)
        ratios = sorted(row["error_vs_rtn"] for row in report.info["layers"].values())
        assert ratios[len(ratios) // 2] < 1, ratios
        assert rel_error(q, model, x) < 1.1 * rel_error(rtn, model, x)


def test_gptq_needs_data():
    net, _ = correlated_mlp()
    with pytest.raises(DataError, match="needs data|calibrat"):
        run_method(net, GPTQ())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_runs_on_cuda():
    net, batches = correlated_mlp()
    q, report = run_method(net.cuda(), GPTQ(bits=4, group_size=32), MethodInputs(data=batches))
    assert q[0].scale.is_cuda and all(row["error_vs_rtn"] < 1 for row in report.info["layers"].values())
    cpu, _ = run_method(net.cpu(), GPTQ(bits=4, group_size=32), MethodInputs(data=batches))
    x = torch.cat(batches)
    assert rel_error(q.cpu(), net, x) < 2 * rel_error(cpu, net, x)


def test_gptq_mse_range_search_beats_minmax_and_rtn_mse():
    net, batches = correlated_mlp()
    x = torch.cat(batches)
    errors = {}
    for rs in ("minmax", "mse"):
        q, _ = run_method(net, GPTQ(bits=3, group_size=32, range_search=rs), MethodInputs(data=batches))
        errors[rs] = rel_error(q, net, x)
    rtn_mse, _ = run_method(net, WeightOnly(bits=3, granularity="group", group_size=32, range_search="mse"))
    assert errors["mse"] < errors["minmax"] < 0.5 * rel_error(rtn_mse, net, x)
