"""quant.smoothquant: outliers moved into the weights make per-tensor int8 activations work, and it deploys."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.primitives import sqnr
from modelpress.quantization.smoothquant import SmoothQuant
from modelpress.quantization.static import StaticInt8


class PostNorm(nn.Module):
    """A residual MLP after a norm whose output also feeds the residual (BERT's layout), with outlier
    channels: nothing can absorb the scales, so they become an explicit Mul."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc2(torch.relu(self.fc1(h)))


def with_outliers(net, norm):
    torch.manual_seed(0)
    with torch.no_grad():
        gain = torch.ones(norm.weight.numel())
        gain[:4] = 40.0
        norm.weight.copy_(gain)
    g = torch.Generator().manual_seed(0)
    return net.eval(), [torch.randn(32, 64, generator=g) for _ in range(4)]


def post_norm():
    net = PostNorm()
    return with_outliers(net, net.norm)


def two_post_norms():
    """Two post-norm blocks: the second block's scales must come from activations of the smoothed first."""
    torch.manual_seed(0)
    net = nn.Sequential(PostNorm(), PostNorm())
    with torch.no_grad():
        net[1].norm.weight.copy_(torch.linspace(0.5, 2, 64))
    return with_outliers(net, net[0].norm)


def pre_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    return with_outliers(net, net[0])


@pytest.mark.parametrize("build,where", [(pre_norm, "folded into 0"), (post_norm, "explicit Mul"),
                                        (two_post_norms, "explicit Mul")],
                         ids=["pre-norm-folded", "post-norm-explicit", "two-blocks"])
def test_smoothquant_beats_plain_static_int8_with_the_same_observer(build, where):
    net, batches = build()
    x = torch.cat(batches)
    plain, _ = run_method(net, StaticInt8(observer="minmax"), MethodInputs(data=batches))
    q, report = run_method(net, SmoothQuant(alpha=0.5, observer="minmax"), MethodInputs(data=batches))
    with torch.no_grad():
        ref = net(x)
        assert sqnr(ref, q(x)) > sqnr(ref, plain(x)) + 3  # at least half the error energy
    first = {pre_norm: "1", post_norm: "fc1", two_post_norms: "1.fc1"}[build]
    assert report.info["smoothing"][first] == where


@pytest.mark.parametrize("build", [pre_norm, post_norm], ids=["pre-norm", "post-norm"])
def test_auto_alpha_is_at_least_as_good_as_any_fixed_alpha_and_plain_int8(build):
    net, batches = build()
    x = torch.cat(batches)
    with torch.no_grad():
        ref = net(x)
        plain = sqnr(ref, run_method(net, StaticInt8(observer="minmax"), MethodInputs(data=batches))[0](x))
        fixed = [sqnr(ref, run_method(net, SmoothQuant(alpha=a, observer="minmax"), MethodInputs(data=batches))[0](x))
                 for a in (0.3, 0.5, 0.8)]
        q, report = run_method(net, SmoothQuant(observer="minmax"), MethodInputs(data=batches))
        auto = sqnr(ref, q(x))
    assert auto > plain + 3 and auto > max(fixed) - 1
    assert "(alpha 0." in next(iter(report.info["smoothing"].values()))


def test_auto_alpha_leaves_flat_activations_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    q, report = run_method(net, SmoothQuant(observer="minmax"), MethodInputs(data=[torch.rand(32, 64)] * 2))
    assert report.info["smoothing"]["0"] == "not smoothed (no alpha lowered the int8 error)"


def test_explicit_scales_reload_and_export_int8_onnx(tmp_path):
    import onnx

    from modelpress.export.deploy import export_deployable
    from modelpress.export.onnx import ort_feeds, ort_session

    net, batches = post_norm()
    q, report = run_method(net, SmoothQuant(alpha=0.5), MethodInputs(data=batches))
    assert report.info["smoothing"] == {"fc1": "explicit Mul", "fc2": "folded into fc1"}  # ReLU is homogeneous
    x = torch.cat(batches)
    path = save_artifact(q, tmp_path / "sq.safetensors")
    again, _ = load_artifact(path, base_model=post_norm()[0])
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    onnx_path, _ = export_deployable(q, x[:4], tmp_path / "sq.onnx")
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Mul"} <= ops
    sess = ort_session(onnx_path)
    out = torch.from_numpy(sess.run(None, ort_feeds(sess, x[:4]))[0])
    with torch.no_grad():
        assert sqnr(q(x[:4]), out) > 30


def test_smoothquant_on_llama_folds_every_norm_and_reloads(tmp_path):
    from modelpress.artifact.hf import HFLogits, import_transformers

    transformers = import_transformers()
    torch.manual_seed(0)
    model = HFLogits(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))).eval()
    batches = [torch.randint(0, 100, (4, 16)) for _ in range(3)]
    cfg = SmoothQuant(alpha=0.5, scope={"exclude": ["re:.*lm_head"]})
    q, report = run_method(model, cfg, MethodInputs(data=batches))
    where = report.info["smoothing"]
    assert where["hf.model.layers.0.self_attn.q_proj"] == "folded into hf.model.layers.0.input_layernorm"
    assert where["hf.model.layers.1.mlp.down_proj"] == "folded into hf.model.layers.1.mlp.up_proj"
    assert where["hf.model.layers.0.self_attn.o_proj"] == "explicit Mul"  # grouped-query attention
    x = batches[0]
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 15
    again, _ = load_artifact(save_artifact(q, tmp_path / "sq.safetensors"), base_model=HFLogits(
        transformers.LlamaForCausalLM(model.hf.config)).eval())
    with torch.no_grad():
        assert torch.equal(again(x), q(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smoothquant_runs_on_cuda():
    net, batches = pre_norm()
    q, report = run_method(net.cuda(), SmoothQuant(observer="minmax"), MethodInputs(data=batches))
    x = torch.cat(batches).cuda()
    with torch.no_grad():
        assert sqnr(net(x), q(x)) > 25
