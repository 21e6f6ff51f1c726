"""Weight-only Linear layers export as ONNX Runtime's MatMulNBits: integers stay integers, outputs match."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from modelpress import quantize
from modelpress.engine import MethodInputs, run_method
from modelpress.export.deploy import export_deployable
from modelpress.export.onnx import export_onnx, ort_feeds, ort_session
from modelpress.export.onnx_nbits import container_bits, export_nbits_onnx
from modelpress.quantization.gptq import GPTQ
from modelpress.quantization.modules import quantize_layer, weight_spec
from modelpress.quantization.weight_only import WeightOnly


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 10)).eval()


def run_onnx(path, x):
    session = ort_session(path, threads=1)
    return torch.from_numpy(session.run(None, ort_feeds(session, x))[0])


@pytest.mark.parametrize("cfg", [
    WeightOnly(bits=4, granularity="group", group_size=32), WeightOnly(bits=4),
    WeightOnly(bits=3, granularity="group", group_size=32, symmetric=False), WeightOnly(bits=8, symmetric=False),
    WeightOnly(bits=2, granularity="group", group_size=16), WeightOnly(bits=6, granularity="tensor")],
    ids=["w4g32", "w4-channel", "w3g32-asym", "w8-asym", "w2g16", "w6-tensor"])
def test_every_width_exports_exactly_at_accuracy_level_0(tmp_path, cfg):
    q = quantize(mlp(), cfg).eval()
    x = torch.randn(3, 7, 96)  # [batch, tokens, features]: MatMulNBits takes [..., K]
    info = export_nbits_onnx(q, x, tmp_path / "q.onnx", accuracy_level=0)
    assert info["matmulnbits"] == 3 and not info["left"]
    nodes = [n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "MatMulNBits"]
    bits = {a.name: a.i for n in nodes for a in n.attribute}["bits"]
    assert bits == container_bits(cfg.bits) and bits in (2, 4, 8)
    assert torch.allclose(run_onnx(tmp_path / "q.onnx", x), q(x), atol=1e-5)


def test_int4_file_is_a_sixth_of_fp32_and_deploys_with_int8_activations(tmp_path):
    model = mlp()
    x = torch.randn(4, 96)
    export_onnx(model, x, tmp_path / "fp.onnx")
    q = quantize(model, WeightOnly(bits=4, granularity="group", group_size=32)).eval()
    path, note = export_deployable(q, x, tmp_path / "q.onnx")
    assert "MatMulNBits (3 weight-only Linear layers, accuracy_level 4)" in note and "SQNR" in note
    # 4 bits + one fp32 scale per 32 weights: ~4.9 bits per weight, biases and the graph on top
    assert path.stat().st_size < (tmp_path / "fp.onnx").stat().st_size / 5
    assert not list(tmp_path.glob(".*partial*"))


def test_layers_that_cannot_go_keep_fp32_and_say_why(tmp_path):
    model = mlp()
    q = quantize(model, WeightOnly(bits=4, granularity="group", group_size=32)).eval()
    q[2] = quantize_layer(model[2], weight_spec(4, "group", 8))  # blocks of 8: below MatMulNBits' 16
    x = torch.randn(4, 96)
    info = export_nbits_onnx(q, x, tmp_path / "q.onnx", accuracy_level=0)
    assert info["matmulnbits"] == 2 and "not a power of two >= 16" in info["left"]["2"]
    assert torch.allclose(run_onnx(tmp_path / "q.onnx", x), q(x), atol=1e-5)
    q[4] = quantize_layer(model[4], weight_spec(4), act_bits=8)  # QAT W4A8 layer
    q[4].set_act_qparams(torch.tensor(0.05), torch.tensor(128.0))
    _, note = export_deployable(q, x, tmp_path / "qat.onnx")
    assert "4 (quantizes its activations" in note and "max abs diff" in note


def test_gptq_gpt2_exports_as_matmulnbits(tmp_path):
    from tests.tinymodels import tiny_gpt2

    model = tiny_gpt2().eval()
    torch.manual_seed(0)
    batches = [torch.randint(0, 100, (2, 16)) for _ in range(2)]
    q, _ = run_method(model, GPTQ(bits=4, group_size=16), MethodInputs(data=batches))
    path, note = export_deployable(q.eval(), batches[0], tmp_path / "gpt2.onnx", accuracy_level=0)
    assert "MatMulNBits (9 weight-only Linear layers" in note
    assert torch.allclose(run_onnx(path, batches[0]), q(batches[0]), atol=1e-4)
