"""Static W8A8 (quant.static_int8): BN folding, fake-quant quality, ONNX QDQ deployment, bad inputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import yaml
from torch import nn

from modelpress import Data, Scope, quantize
from modelpress.core.errors import ConfigError, DataError, UnsupportedError
from modelpress.core.training import TrainConfig, fit
from modelpress.engine import MethodInputs, run_method
from modelpress.export.onnx import ort_session
from modelpress.export.onnx_quant import export_int8_onnx
from modelpress.quantization.fold import fold_batchnorm
from modelpress.quantization.observers import OBSERVERS
from modelpress.quantization.primitives import sqnr
from modelpress.quantization.static import FakeQuant, QuantizedLayer, StaticInt8
from modelpress.zoo.models import build_model


class TinyResNet(nn.Module):
    """conv-bn-relu, a residual block, max-pool, flatten, linear: every placement rule once."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_net():
    torch.manual_seed(0)
    net = TinyResNet()
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def images(n, seed):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


CALIB = [images(32, s) for s in range(4)]


def test_fold_batchnorm_matches_resnet_small_and_removes_every_bn():
    torch.manual_seed(0)
    model = build_model("resnet_small")
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    res = fold_batchnorm(model)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert (res.model(x) - model(x)).abs().max() < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    assert len(res.folded) == 9 and res.kept == [] and res.note is None
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # input untouched


def test_fold_leaves_bn_and_reports_when_fx_cannot_trace():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # control flow on values: fx cannot trace
                x = x * 2
            return self.bn(self.conv(x))

    res = fold_batchnorm(Dynamic())
    assert res.folded == [] and res.kept == ["bn"] and "torch.fx could not trace" in res.note


@pytest.mark.parametrize("observer", OBSERVERS)
def test_fake_quant_sqnr_floor_per_observer(observer):
    net = tiny_net()
    q, report = run_method(net, StaticInt8(observer=observer), MethodInputs(data=CALIB))
    x = images(64, 99)
    with torch.no_grad():
        assert sqnr(net(x), q(x)) > 25
    assert report.info["quantized_layers"] == ["stem.0", "conv1", "conv2", "fc"]
    assert len(report.info["folded_bn"]) == 3 and report.info["calibration_batches"] == 4


def test_placement_relu_folds_into_output_range_and_shape_ops_share_scales():
    q = quantize(tiny_net(), StaticInt8(observer="minmax"), CALIB)
    quants = {n: m for n, m in q.named_modules() if isinstance(m, FakeQuant)}
    # input, stem, conv1(+relu), conv2, add(+relu), shared after max-pool and flatten, fc
    owners = [m for m in quants.values() if m.share_from is None]
    shared = [m for m in quants.values() if m.share_from is not None]
    assert len(owners) == 6 and len(shared) == 2
    for m in shared:
        assert torch.equal(m.scale, quants[m.share_from].scale)
    relu_outs = [m for m in owners if float(m.zero) == 0 and m.observer.lo.min() >= 0]
    assert len(relu_outs) >= 3  # stem, conv1 and the add see ReLU outputs: zero point 0
    assert all(isinstance(q.get_submodule(n), QuantizedLayer) for n in ("stem.0", "conv1", "conv2", "fc"))


def test_weights_are_per_channel_7_bit_symmetric_by_default():
    q = quantize(tiny_net(), StaticInt8(), CALIB)
    layer = q.get_submodule("conv1")
    w = layer.quantized_weight().detach()
    codes = w / layer.w_scale.view(-1, 1, 1, 1)
    assert layer.w_scale.shape == (8,)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 63.5


def test_onnx_qdq_export_matches_fake_quant_model(tmp_path):
    net = tiny_net()
    q = quantize(net, StaticInt8(observer="mse"), CALIB)
    path = export_int8_onnx(q, images(2, 5), tmp_path / "q.onnx")
    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}
    kinds = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= kinds
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert len(weights) == 4
    for n in weights:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
        assert [a.i for a in n.attribute if a.name == "axis"] == [0]
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1 for t in graph.initializer)
    biases = [t for t in graph.initializer if t.name.endswith("bias_q_quantized")]
    assert len(biases) == 4 and all(t.data_type == onnx.TensorProto.INT32 for t in biases)  # folded BN: all have one

    x = images(200, 7)
    out = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
    scale = float(q.get_submodule(list(q.graph.nodes)[-2].target).scale)  # the logits' quantizer
    assert np.abs(out - ref).max() <= 2 * scale + 1e-6
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_static_int8_lenet5_through_onnxruntime_within_one_point(tmp_path):
    from modelpress.zoo.datasets import load_dataset

    bundle = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = build_model("lenet5")
    fit(model, Data(bundle.train, batch_size=64, shuffle=True), TrainConfig(epochs=2, lr=3e-3))
    model.eval()
    calib = [torch.stack([bundle.train[i][0] for i in range(j, j + 64)]) for j in range(0, 512, 64)]
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    y = np.array([int(bundle.test[i][1]) for i in range(len(bundle.test))])
    with torch.no_grad():
        acc_fp32 = float((model(x).argmax(1).numpy() == y).mean())
    q = quantize(model, StaticInt8(), calib)
    path = export_int8_onnx(q, x[:4], tmp_path / "lenet5-int8.onnx")
    out = ort_session(path).run(None, {"input": x.numpy()})[0]
    acc_int8 = float((out.argmax(1) == y).mean())
    assert acc_fp32 > 0.9
    assert acc_int8 >= acc_fp32 - 0.01
    assert path.stat().st_size < 0.35 * 4 * sum(p.numel() for p in model.parameters())


def test_scope_exclusion_keeps_the_layer_float():
    q = quantize(tiny_net(), StaticInt8(scope=Scope(exclude=["fc"])), CALIB)
    assert isinstance(q.get_submodule("fc"), nn.Linear)
    assert isinstance(q.get_submodule("conv2"), QuantizedLayer)


def test_config_round_trips_and_names_bad_fields():
    cfg = StaticInt8(observer="kl", weight_granularity="tensor", calibration_batches=2)
    assert StaticInt8.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="StaticInt8.observer"):
        StaticInt8(observer="entropy")
    with pytest.raises(ConfigError, match="StaticInt8.calibration_batches"):
        StaticInt8(calibration_batches=0)


def test_bad_inputs_raise_our_errors(tmp_path):
    net = tiny_net()
    with pytest.raises(DataError, match="calibration data is empty"):
        quantize(net, StaticInt8(), [])
    with pytest.raises(DataError, match="needs data"):
        quantize(net, StaticInt8())
    with pytest.raises(DataError, match="NaN"):
        quantize(net, StaticInt8(), [torch.full((2, 1, 8, 8), float("nan"))])
    with pytest.raises(UnsupportedError, match="no int8 quantizers"):
        export_int8_onnx(net, images(2, 0), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_artifact_of_a_static_model_reloads_to_identical_outputs(tmp_path):
    """The fx-rewritten model is recorded as (structure, method + config): reload replays it."""
    from modelpress import load_artifact, save_artifact
    from modelpress.export.deploy import export_deployable

    base = build_model("resnet_small").eval()
    torch.manual_seed(0)
    q = quantize(base, StaticInt8(), [torch.randn(16, 1, 28, 28) for _ in range(2)])
    x = torch.randn(4, 1, 28, 28)
    path = save_artifact(q, tmp_path / "q.safetensors")
    for kwargs in ({}, {"base_model": base}):  # from the zoo source, and from the user's model
        again, header = load_artifact(path, **kwargs)
        assert header["replay"][0]["method"] == "quant.static_int8"
        assert torch.equal(q(x), again(x))
    assert sum(isinstance(m, FakeQuant) for m in base.modules()) == 0  # the input model is untouched
    onnx_path, note = export_deployable(again, x, tmp_path / "q.onnx")
    assert "int8 QDQ" in note and onnx_path.stat().st_size < path.stat().st_size / 2


@pytest.mark.nlp
def test_models_fx_cannot_trace_are_quantized_layer_by_layer(tmp_path):
    """Hugging Face models (keyword inputs, Python control flow) defeat torch.fx: each Linear's input
    and weights are quantized instead; the artifact reloads and the ONNX QDQ file runs in ORT."""
    pytest.importorskip("transformers")
    from modelpress.artifact.checkpoint import save_artifact
    from modelpress.artifact.hf import HFLogits, import_transformers
    from modelpress.artifact.loading import load_artifact
    from modelpress.engine import MethodInputs, run_method
    from modelpress.export.deploy import export_deployable

    t = import_transformers()
    torch.manual_seed(0)
    model = HFLogits(t.BertForSequenceClassification(t.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 100, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(4)]
    q, report = run_method(model, StaticInt8(), MethodInputs(data=data))
    assert report.info["capture"].startswith("layers") and len(report.info["quantized_layers"]) == 14
    x = data[0]
    with torch.no_grad():
        assert sqnr(model(**x), q(**x)) > 25
    path = save_artifact(q, tmp_path / "q.safetensors")
    again, _ = load_artifact(path, base_model=model)
    with torch.no_grad():
        assert torch.equal(again(**x), q(**x))
    _, note = export_deployable(q, x, tmp_path / "q.onnx")
    assert note.startswith("int8 QDQ")


def test_timm_vit_flag_inputs_are_baked_in_and_the_int8_graph_exports(tmp_path):
    from modelpress.core.compat import prepare_torchvision
    from modelpress.export.deploy import export_deployable

    prepare_torchvision()
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    q, report = run_method(model, StaticInt8(), MethodInputs(data=[(x, torch.zeros(2, dtype=torch.long))]))
    assert report.info["capture"] == "graph"
    assert "is_causal" not in [n.name for n in q.graph.nodes if n.op == "placeholder"]  # now a constant
    path, note = export_deployable(q, x, tmp_path / "vit.onnx")  # was: is_causal must be bool, not Tensor
    assert path.exists() and note.startswith("int8 QDQ")
