"""quant.awq: activation-aware scales beat round-to-nearest on outlier channels, fold exactly, deploy."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import DataError
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.awq import AWQ
from modelpress.quantization.modules import QuantLinear
from modelpress.quantization.weight_only import WeightOnly


def outlier_block(seed=0):
    """Pre-norm MLP whose norm gives a few channels 20x the others (as LLM activations have)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.LayerNorm(128), nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    with torch.no_grad():
        gain = torch.ones(128)
        gain[torch.randperm(128)[:6]] = 20.0
        net[0].weight.copy_(gain)
    g = torch.Generator().manual_seed(seed)
    return net, [torch.randn(64, 128, generator=g) for _ in range(6)]


def rel_error(model, ref_model, x):
    with torch.no_grad():
        ref = ref_model(x)
        return float((model(x) - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_and_folds_into_the_norm(bits):
    net, batches = outlier_block()
    x = torch.cat(batches)
    rtn, _ = run_method(net, WeightOnly(bits=bits, granularity="group", group_size=32))
    q, report = run_method(net, AWQ(bits=bits, group_size=32), MethodInputs(data=batches))
    # w4: 0.58 of RTN's error (0.5 before int4 RTN used all 16 levels, amax / 7.5)
    assert rel_error(q, net, x) < 0.7 * rel_error(rtn, net, x)
    layers = report.info["layers"]
    assert layers["1"]["scaled_into"] == "0" and layers["1"]["alpha"] > 0
    assert layers["3"]["scaled_into"] is None  # GELU in front: nothing can absorb its scales
    assert all(r["error_vs_rtn"] < 1 for r in layers.values())
    assert isinstance(q[1], QuantLinear) and isinstance(q[3], QuantLinear) and q[1].qspec.bits == bits
    assert not torch.equal(q[0].weight, net[0].weight)  # the scales went into the norm of the copy ...
    assert set(net[0].weight.unique().tolist()) == {1.0, 20.0}  # ... and the input model is untouched


def test_awq_scales_alone_leave_the_float_model_unchanged():
    net, batches = outlier_block(1)
    q, report = run_method(net, AWQ(bits=8, granularity="channel", clip=False), MethodInputs(data=batches))
    x = torch.cat(batches)
    assert report.info["layers"]["1"]["scaled_into"] == "0"
    assert rel_error(q, net, x) < 1e-4  # 8-bit rounding only: the fold itself is exact


def test_awq_folds_into_an_already_quantized_up_proj_on_llama_and_reloads(tmp_path):
    from modelpress.artifact.hf import HFLogits, import_transformers

    transformers = import_transformers()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = HFLogits(transformers.LlamaForCausalLM(cfg)).eval()
    batches = [torch.randint(0, 100, (4, 16)) for _ in range(3)]
    q, report = run_method(model, AWQ(bits=4, group_size=32, scope={"exclude": ["re:.*lm_head"]}),
                           MethodInputs(data=batches))
    layers = report.info["layers"]
    assert len(layers) == 14
    down = [n for n in layers if n.endswith("down_proj")]
    assert {layers[n]["scaled_into"] for n in down if layers[n]["alpha"] > 0} <= {n.replace("down", "up") for n in down}
    rtn, _ = run_method(model, WeightOnly(bits=4, granularity="group", group_size=32,
                                          scope={"exclude": ["re:.*lm_head"]}))
    x = torch.randint(0, 100, (4, 16))
    assert rel_error(q, model, x) < rel_error(rtn, model, x)
    path = save_artifact(q, tmp_path / "awq.safetensors")
    again, _ = load_artifact(path, base_model=HFLogits(transformers.LlamaForCausalLM(cfg)).eval())
    assert torch.equal(again(x), q(x))


def test_awq_needs_data():
    net, _ = outlier_block()
    with pytest.raises(DataError, match="needs data|calibrat"):
        run_method(net, AWQ())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_awq_runs_on_cuda():
    net, batches = outlier_block()
    q, report = run_method(net.cuda(), AWQ(bits=4, group_size=32), MethodInputs(data=batches))
    assert q[1].scale.is_cuda and report.info["layers"]["1"]["scaled_into"] == "0"
    x = torch.cat(batches)
    cpu, _ = run_method(net.cpu(), AWQ(bits=4, group_size=32), MethodInputs(data=batches))
    assert rel_error(q.cpu(), net, x) < 2 * rel_error(cpu, net, x)
