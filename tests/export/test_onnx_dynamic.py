"""ONNX Runtime dynamic int8 deployment of ``quant.dynamic_int8`` models (export/onnx_dynamic.py)."""
import numpy as np
import pytest
import torch
from torch import nn

from modelpress import quantize
from modelpress.core.errors import ConfigError
from modelpress.export.deploy import export_deployable, float_copy
from modelpress.export.onnx import ort_session
from modelpress.export.onnx_dynamic import quantize_onnx_dynamic
from modelpress.quantization.dynamic import DynamicInt8


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(500, 64)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 16)

    def forward(self, input_ids):
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids)))).mean(1)


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    return quantize(TinyEncoder().eval(), DynamicInt8())


def _run(path, ids):
    return ort_session(path).run(None, {"input": ids.numpy()})[0]


def test_float_copy_holds_the_dequantized_weights(quantized):
    f = float_copy(quantized)
    assert type(f.fc1) is nn.Linear and type(f.emb) is nn.Embedding
    assert torch.equal(f.fc1.weight, quantized.fc1.dequantized_weight())
    assert torch.equal(f.emb.weight, quantized.emb.dequantized_weight())
    assert type(quantized.fc1) is not nn.Linear  # the input model is untouched


def test_float_copy_decodes_weight_shared_layers_into_plain_ones():
    from modelpress import WeightSharing

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, groups=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    shared = quantize(net, WeightSharing(bits=3))
    f = float_copy(shared)
    assert type(f[0]) is nn.Conv2d and type(f[3]) is nn.Linear and f[0].padding == (1, 1)
    assert len(torch.unique(f[3].weight)) <= 2 ** 3 + 1 and torch.equal(f[3].bias, shared[3].bias)
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert torch.allclose(f(x), shared(x), atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4, None])
def test_export_deployable_writes_an_ort_int8_model(quantized, tmp_path, bits):
    ids = torch.randint(0, 500, (4, 12))
    path, note = export_deployable(quantized, ids, tmp_path / "m.onnx", embedding_bits=bits)
    assert "dynamic int8" in note and path.is_file() and not list(tmp_path.glob(".*"))  # no temp files left
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}
    assert ("GatherBlockQuantized" in ops) == (bits == 4)
    ref = quantized(ids).detach().numpy()
    out = _run(path, ids)
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert out.shape == (4, 16) and cos.min() > 0.99


def test_4bit_tables_make_the_file_smaller(quantized, tmp_path):
    ids = torch.randint(0, 500, (2, 8))
    sizes = {b: export_deployable(quantized, ids, tmp_path / f"m{b}.onnx", embedding_bits=b)[0].stat().st_size
             for b in (None, 8, 4)}
    table = 500 * 64
    assert sizes[None] - sizes[8] > 0.7 * 3 * table  # float -> int8 saves ~3 bytes per table entry
    assert sizes[8] - sizes[4] > 0.35 * table  # int8 -> 4 bits saves another ~half byte


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="embedding_bits"):
        quantize_onnx_dynamic(tmp_path / "a.onnx", tmp_path / "b.onnx", embedding_bits=2)
    with pytest.raises(ConfigError, match="power of two"):
        quantize_onnx_dynamic(tmp_path / "a.onnx", tmp_path / "b.onnx", block_size=24)
    with pytest.raises(ConfigError, match="does not exist"):
        quantize_onnx_dynamic(tmp_path / "missing.onnx", tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()
