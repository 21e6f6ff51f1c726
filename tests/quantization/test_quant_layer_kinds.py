"""Quantization and low-rank methods on the layer kinds real models use (issue 15): GPT-2's ``Conv1D``,
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, and layers whose parent reads their weight
(``nn.MultiheadAttention``'s ``out_proj``, ``nn.TransformerEncoderLayer``'s fast path).

Every registered quantization / low-rank method that handles ``Linear`` runs from its default config
on a tiny transformer encoder, LSTM and GRU classifiers and a tiny GPT-2: it either compresses
(output shape kept, no NaN, the layers it reports really replaced, a quality floor met, an artifact
that reloads to the same outputs) or refuses with a ModelpressError, never another exception.
"""
from __future__ import annotations

import copy

import pytest
import torch
from tinymodels import TinyEncoder, TinyRNN, layer_kind_cases, tiny_gpt2
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ModelpressError
from modelpress.core.scope import Scope, type_matches
from modelpress.core.training import TrainConfig
from modelpress.engine import MethodInputs, list_methods, run_method
from modelpress.export.deploy import export_deployable
from modelpress.lowrank.layers import FactorizedLayer
from modelpress.lowrank.svd import SVD
from modelpress.nn.attention import convert_multihead_attention
from modelpress.nn.layer_kinds import linear_equivalent
from modelpress.quantization.adaround import AdaRound
from modelpress.quantization.codebook import CodebookLinear, PowerOfTwo, WeightSharing
from modelpress.quantization.dynamic import DynamicInt8
from modelpress.quantization.modules import QuantConv2d, QuantLinear
from modelpress.quantization.primitives import QuantSpec, quantize_tensor, sqnr
from modelpress.quantization.qat import QAT
from modelpress.quantization.rnn import QuantRNN
from modelpress.quantization.weight_only import WeightOnly

CASES = layer_kind_cases()
METHODS = [m for m in list_methods() if m.family in ("quant", "lowrank") and "Linear" in m.layer_types]
RECURRENT_METHODS = {"quant.weight_only", "quant.dynamic_int8"}  # the others leave LSTM/GRU and report them
# Output SQNR floors (dB) at the default configs, through every quantized layer of the model (GPT-2:
# nine): 20 dB; power-of-two levels cost ~13 dB per layer and QAT without training is W4A8: 15 dB.
FLOOR = {"quant.log2": 15.0, "quant.qat": 15.0}
# Refusals with a reason: quant.log2 keeps the first and last layer in float by default, and the
# recurrent classifiers have no other Linear.
REFUSES = {("quant.log2", "lstm"), ("quant.log2", "gru")}


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_method_list_covers_the_linear_methods():
    names = {m.name for m in METHODS}
    assert {"quant.weight_only", "quant.dynamic_int8", "quant.kmeans", "quant.log2", "quant.adaround",
            "quant.mixed_precision", "quant.qat", "quant.static_int8", "lowrank.svd"} <= names


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("info", METHODS, ids=lambda i: i.name)
def test_method_runs_or_refuses_on_layer_kind(info, case, tmp_path):
    build, batches, _ = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = batches[0][0]
    ref = _outputs(model, x)
    if (info.name, case) in REFUSES:
        with pytest.raises(ModelpressError, match="selects no"):
            run_method(model, info.config_cls(), MethodInputs(data=batches))
        return
    out_model, report = run_method(model, info.config_cls(), MethodInputs(data=batches))
    out = _outputs(out_model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert sqnr(ref, out) > FLOOR.get(info.name, 20.0), f"{info.name} on {case}"

    # what is left alone is reported, never silently skipped: Conv1D is a Linear, LSTM/GRU are
    # handled by the recurrent-aware methods and reported by the others
    assert not [t for t in report.unsupported_layers.values() if t == "Conv1D"]
    if case in ("lstm", "gru"):
        if info.name in RECURRENT_METHODS:
            assert "rnn" not in report.unsupported_layers and isinstance(out_model.rnn, QuantRNN)
        else:
            assert report.unsupported_layers["rnn"] == case.upper()

    # the layers the method reports are really replaced (nn.MultiheadAttention first becomes its
    # equivalent with four Linear projections, which the method then handles too)
    converted = copy.deepcopy(model)
    convert_multihead_attention(converted)
    modules = dict(converted.named_modules())
    graph_methods = ("quant.static_int8", "quant.smoothquant")  # a graph module: layers wrapped in place
    if info.name in graph_methods:
        done = report.info["quantized_layers"]
    elif info.name == "quant.mixed_precision":
        done = [row["layer"] for row in report.info["layers"]]
    else:
        done = list(report.info["layers"])
    if info.name == "lowrank.svd":  # random tiny weights: full rank, so every layer may be left dense
        assert set(done) | set(report.info["skipped"]) == {n for n, m in modules.items()
                                                           if n and type_matches(m, info.layer_types)}
    else:
        assert done
    replaced = dict(out_model.named_modules())
    for name in done:
        if info.name not in graph_methods:
            assert type(replaced[name]) is not type(modules[name]), f"{name} was not replaced"

    path = save_artifact(out_model, tmp_path / "a.safetensors")
    again, _ = load_artifact(path, base_model=model)
    assert torch.equal(_outputs(again, x), out)


# -- GPT-2's Conv1D is a Linear --------------------------------------------------------------------
def test_conv1d_is_a_linear_to_scopes_and_its_linear_equivalent_computes_the_same():
    torch.manual_seed(0)
    gpt2 = tiny_gpt2().eval()
    c_attn = gpt2.hf.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "Conv1D" and type_matches(c_attn, ["Linear"])
    names = [n for n, _ in Scope(include=["type:Linear"]).resolve(gpt2, ("Linear",))]
    assert "hf.transformer.h.0.attn.c_attn" in names and "hf.lm_head" in names
    lin = linear_equivalent(c_attn)
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (32, 96)
    x = torch.randn(3, 7, 32)
    assert torch.allclose(lin(x), c_attn(x), atol=1e-6)
    assert lin.weight.data_ptr() != c_attn.weight.data_ptr()  # a copy: the model's layer is untouched


def test_weight_only_quantizes_conv1d_per_output_channel():
    torch.manual_seed(0)
    gpt2 = tiny_gpt2().eval()
    conv = gpt2.hf.transformer.h[0].mlp.c_fc  # Conv1D(nf=128, nx=32): weight stored [32, 128]
    q, report = run_method(gpt2, WeightOnly(bits=4), MethodInputs())
    packed = q.hf.transformer.h[0].mlp.c_fc
    assert isinstance(packed, QuantLinear) and (packed.in_features, packed.out_features) == (32, 128)
    assert packed.scale.shape == (128, 1)  # one scale per output feature, not per input
    expect = quantize_tensor(conv.weight.detach().t(), QuantSpec(bits=4, granularity="channel")).dequantize()
    assert torch.equal(packed.weight, expect)
    assert report.info["layers"]["hf.transformer.h.0.mlp.c_fc"]["sqnr_db"] > 15
    x = torch.randn(2, 5, 32)
    assert sqnr(conv(x), packed(x)) > 15


def test_svd_factorizes_conv1d_as_the_linear_it_is(tmp_path):
    torch.manual_seed(0)
    gpt2 = tiny_gpt2().eval()
    w = gpt2.hf.transformer.h[0].mlp.c_fc.weight.detach().t().double()  # (out, in)
    f, report = run_method(gpt2, SVD(param_ratio=0.5), MethodInputs())
    fact = f.hf.transformer.h[0].mlp.c_fc
    assert isinstance(fact, FactorizedLayer) and fact[0].in_features == 32 and fact[1].out_features == 128
    rank = report.info["layers"]["hf.transformer.h.0.mlp.c_fc"]["rank"]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    assert torch.allclose((fact[1].weight @ fact[0].weight).double(), best, atol=1e-5)
    x = torch.randint(0, 100, (2, 8))
    path = save_artifact(f, tmp_path / "svd.safetensors")
    again, _ = load_artifact(path, base_model=gpt2)
    assert torch.equal(_outputs(again, x), _outputs(f, x))


# -- replaced layers still look like what they replaced --------------------------------------------
def _fast_and_slow(model, x):
    """The encoder's output on its fused inference fast path (reads the layers' weights) and on
    the module path (calls the layers)."""
    fast = _outputs(model, x)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        slow = _outputs(model, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return fast, slow


def test_packed_layers_expose_weight_bias_and_geometry():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    q, _ = run_method(model, WeightOnly(bits=8), MethodInputs())
    lin = q.enc.linear1
    assert isinstance(lin, QuantLinear) and (lin.in_features, lin.out_features) == (32, 64)
    assert lin.weight.dtype == torch.float32 and lin.weight.shape == (64, 32)
    assert lin.weight is lin.weight  # cached, not dequantized on every read
    assert torch.equal(lin.weight, lin.dequantized_weight())
    assert set(lin.state_dict()) == {"qweight", "scale", "bias"}  # nothing extra is saved
    fast, slow = _fast_and_slow(q, torch.randn(4, 6, 16))
    assert torch.allclose(fast, slow, atol=1e-5)  # MHA's out_proj and the fused path read .weight

    class PatchNet(nn.Module):  # ViT-style: the model reads its conv's weight dtype
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 16, 4, stride=4)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.proj(x.to(self.proj.weight.dtype)).flatten(2).mean(-1))

    net = PatchNet().eval()
    qc, _ = run_method(net, WeightOnly(bits=8), MethodInputs())
    conv = qc.proj
    assert isinstance(conv, QuantConv2d) and conv.weight.shape == net.proj.weight.shape
    assert (conv.in_channels, conv.out_channels, conv.padding_mode) == (3, 16, "zeros")
    x = torch.randn(2, 3, 16, 16)
    assert sqnr(net(x), qc(x)) > 30


def test_codebook_layers_expose_weight_and_bias_in_the_compute_dtype(tmp_path):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    q, _ = run_method(model, WeightSharing(bits=5), MethodInputs())
    lin = q.enc.linear1
    assert isinstance(lin, CodebookLinear) and lin.codebook.dtype == torch.float16  # stored small
    assert lin.weight.dtype == torch.float32 and lin.bias.dtype == torch.float32  # computed as before
    assert "compute_dtype" not in lin.spec()  # float32 is the default: artifacts stay as they were
    assert set(lin.state_dict()) == {"table", "indices"}
    fast, slow = _fast_and_slow(q, torch.randn(4, 6, 16))
    assert torch.allclose(fast, slow, atol=1e-5)

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double().eval()
    qd, _ = run_method(net, WeightSharing(bits=4), MethodInputs())
    assert qd[0].weight.dtype == torch.float64 and qd[0].spec()["compute_dtype"] == "float64"
    x = torch.randn(3, 8, dtype=torch.float64)
    again, _ = load_artifact(save_artifact(qd, tmp_path / "f64.safetensors"), base_model=net)
    assert again[0].weight.dtype == torch.float64 and torch.equal(again(x), qd(x))


ATTENTION = {f"enc.self_attn.{p}_proj" for p in ("q", "k", "v", "out")}


def test_adaround_learns_the_rounding_of_every_attention_projection():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    batches = CASES["encoder"][1]
    q, report = run_method(model, AdaRound(bits=4, iterations=20), MethodInputs(data=batches))
    assert not report.info.get("round_to_nearest")  # nn.MultiheadAttention became four Linears it calls
    assert isinstance(q.enc.self_attn.out_proj, QuantLinear)
    assert {"proj", "enc.linear1", "enc.linear2", "head"} | ATTENTION <= set(report.info["layers"])


def test_qat_quantizes_the_inputs_of_the_encoder_layers_too():
    torch.manual_seed(0)
    model = TinyEncoder()
    batches = CASES["encoder"][1]
    q, report = run_method(model, QAT(weight_bits=4, act_bits=8, observer_steps=1),
                           MethodInputs(data=batches, train=TrainConfig(epochs=2, lr=1e-3, batch_size=8)))
    assert not report.info.get("float_activations")  # no fused fast path reads the weights any more
    assert q.enc.linear1.act_bits == 8 and q.enc.self_attn.q_proj.act_bits == 8 and q.head.act_bits == 8
    fast, slow = _fast_and_slow(q, torch.randn(4, 6, 16))
    assert torch.allclose(fast, slow, atol=1e-5)  # the deployed model computes what was trained


def test_svd_factorizes_the_encoder_layers_and_attention_projections():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    f, report = run_method(model, SVD(param_ratio=0.5), MethodInputs())
    assert not report.info["skipped"]
    assert all(isinstance(f.get_submodule(n), FactorizedLayer) for n in ATTENTION | {"enc.linear1", "proj"})
    fast, slow = _fast_and_slow(f, torch.randn(4, 6, 16))
    assert torch.allclose(fast, slow, atol=1e-5)


# -- recurrent layers --------------------------------------------------------------------------
RNNS = {"lstm": lambda: nn.LSTM(16, 24, num_layers=2, batch_first=True, bidirectional=True),
        "gru": lambda: nn.GRU(16, 24, num_layers=2, batch_first=True, bidirectional=True),
        "rnn_relu": lambda: nn.RNN(16, 24, nonlinearity="relu", batch_first=True),
        "lstm_proj": lambda: nn.LSTM(16, 24, proj_size=8, batch_first=True)}


@pytest.mark.parametrize("kind", list(RNNS))
@pytest.mark.parametrize("bits,floor", [(8, 35.0), (4, 12.0)])
def test_quant_rnn_matches_the_float_layer_and_reloads(kind, bits, floor, tmp_path):
    torch.manual_seed(0)
    rnn = RNNS[kind]()
    model = nn.Sequential(rnn).eval()
    q, report = run_method(model, WeightOnly(bits=bits), MethodInputs())
    packed = q[0]
    assert isinstance(packed, QuantRNN) and packed.hidden_size == 24 and packed.batch_first
    names = [n for n in rnn._flat_weights_names if n.startswith("weight_")]
    assert packed.weight_names == names
    for n in names:  # every matrix stored as integers, read back by its name
        assert packed.packed[n].qweight.dtype == torch.uint8
        assert getattr(packed, n).shape == getattr(rnn, n).shape
    assert not [k for k in packed.state_dict() if k.endswith("weight_ih_l0")]  # no float weights saved
    assert report.info["layers"]["0"]["sqnr_db"] > floor
    x = torch.randn(3, 5, 16)
    out, ref = _outputs(q, x), _outputs(model, x)
    assert sqnr(ref[0], out[0]) > floor - 5
    again, header = load_artifact(save_artifact(q, tmp_path / "rnn.safetensors"), base_model=model)
    assert header["structure"]["0"]["class"] == "QuantRNN"
    assert torch.equal(_outputs(again, x)[0], out[0])
    seqs = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 2]), batch_first=True)
    assert torch.allclose(_outputs(q, seqs)[0].data, _outputs(model, seqs)[0].data, atol=0.5)
    if bits == 8 and kind == "lstm_proj":  # torch writes an ONNX LSTM without the projection
        with pytest.raises(ModelpressError, match="ONNX Runtime cannot run the exported graph"):
            export_deployable(q, x, tmp_path / "rnn.onnx")
        assert not list(tmp_path.glob("*.onnx"))
    elif bits == 8:  # ONNX: the float recurrent op on the dequantized weights, checked in ONNX Runtime
        path, note = export_deployable(q, x, tmp_path / "rnn.onnx")
        assert path.exists() and note.startswith("fp32")


@pytest.mark.nlp
@pytest.mark.parametrize("config", [WeightSharing(iters=3), PowerOfTwo()], ids=["kmeans", "log2"])
def test_codebook_layers_inside_gpt2_export_to_onnx(config, tmp_path):
    # their bias lives in the codebook table, not the state dict: the tracer took it for a constant
    # that required grad ("Cannot insert a Tensor that requires grad as a constant")
    build, batches, _ = CASES["gpt2"]
    q, _ = run_method(build().eval(), config, MethodInputs(data=batches))
    path, note = export_deployable(q, batches[0][0], tmp_path / "gpt2.onnx")
    assert path.exists() and "max abs diff" in note


def test_encoder_quantized_everywhere_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    build, batches, _ = CASES["encoder"]
    x = batches[0][0]
    for config, expected in ((WeightOnly(bits=4), ("MatMulNBits (8 weight-only", "SQNR")),
                             (QAT(weight_bits=4, act_bits=8, observer_steps=1), ("quantizes its activations",
                                                                                  "max abs diff"))):
        q, _ = run_method(build().eval(), config, MethodInputs(data=batches))
        path, note = export_deployable(q, x, tmp_path / "enc.onnx")
        assert path.exists() and all(e in note for e in expected), note


def test_dynamic_int8_stores_recurrent_weights_as_int8():
    torch.manual_seed(0)
    model = TinyRNN("LSTM").eval()
    q, report = run_method(model, DynamicInt8(), MethodInputs())
    assert isinstance(q.rnn, QuantRNN) and q.rnn.qspec.bits == 8
    assert "float compute" in report.info["fallback"]["rnn"]
    assert report.info["layers"]["rnn"]["weight_sqnr_db"] > 35
    x = torch.randn(4, 5, 8)
    assert sqnr(model(x), q(x)) > 30


def test_recurrent_subclass_with_its_own_forward_is_left_alone_and_reported():
    class PeepholeLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    torch.manual_seed(0)
    model = nn.Sequential(PeepholeLSTM(8, 8, batch_first=True)).eval()
    q, report = run_method(model, WeightOnly(), MethodInputs())
    assert "overrides LSTM.forward" in report.info["skipped"]["0"] and isinstance(q[0], PeepholeLSTM)
    with pytest.raises(ModelpressError, match="overrides LSTM.forward"):  # nothing else to quantize: it says why
        run_method(model, DynamicInt8(), MethodInputs())
