"""Zoo models: shapes, hand-counted parameters and MACs, structure, registry behaviour."""
import operator
import subprocess
import sys

import pytest
import torch
from torch import nn

from modelpress.core.errors import ModelLoadError
from modelpress.zoo.models import build_model, list_models

CNN_MODELS = ["lenet5", "lenet300", "resnet_small", "mobilenetv2_small"]


def conv(cin, cout, k, bias=True, groups=1):
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def linear(fin, fout):
    return fin * fout + fout


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# hand counts, layer by layer, from the architecture descriptions in the docstrings
LENET5 = conv(1, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 84) + linear(84, 10)
LENET300 = linear(784, 300) + linear(300, 100) + linear(100, 10)
RESNET_SMALL = (
    conv(1, 16, 3, False) + bn(16)
    + 2 * (conv(16, 16, 3, False) + bn(16))                                         # layer1
    + conv(16, 32, 3, False) + conv(32, 32, 3, False) + 2 * bn(32) + conv(16, 32, 1, False) + bn(32)
    + conv(32, 64, 3, False) + conv(64, 64, 3, False) + 2 * bn(64) + conv(32, 64, 1, False) + bn(64)
    + linear(64, 10))


def inverted_residual(cin, cout, t):
    hidden = cin * t
    expand = 0 if t == 1 else conv(cin, hidden, 1, False) + bn(hidden)
    return expand + conv(hidden, hidden, 3, False, groups=hidden) + bn(hidden) + conv(hidden, cout, 1, False) + bn(cout)


MOBILENET_SMALL = (conv(1, 16, 3, False) + bn(16)
                   + inverted_residual(16, 16, 1)
                   + inverted_residual(16, 24, 4) + inverted_residual(24, 24, 4)
                   + inverted_residual(24, 32, 4) + inverted_residual(32, 32, 4)
                   + conv(32, 128, 1, False) + bn(128) + linear(128, 10))


@pytest.mark.parametrize("name,expected", [("lenet5", 61_706), ("lenet300", 266_610),
                                           ("resnet_small", 77_754), ("mobilenetv2_small", 32_234)])
def test_parameter_counts_match_hand_counts(name, expected):
    hand = {"lenet5": LENET5, "lenet300": LENET300, "resnet_small": RESNET_SMALL,
            "mobilenetv2_small": MOBILENET_SMALL}[name]
    assert hand == expected
    assert n_params(build_model(name)) == expected


@pytest.mark.parametrize("name", CNN_MODELS)
def test_forward_shape_and_spec(name):
    torch.manual_seed(0)
    model = build_model(name)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert model.zoo_spec == {"zoo": name, "kwargs": {}}


@pytest.mark.parametrize("name", CNN_MODELS)
def test_kwargs_change_classes_and_channels(name):
    model = build_model(name, num_classes=3, in_channels=3)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 3)
    assert model.zoo_spec == {"zoo": name, "kwargs": {"num_classes": 3, "in_channels": 3}}


@pytest.mark.parametrize("name", CNN_MODELS)
def test_rebuild_from_spec_gives_same_architecture(name):
    kwargs = {"width": 0.5} if name in ("resnet_small", "mobilenetv2_small") else {"num_classes": 7}
    a = build_model(name, **kwargs)
    b = build_model(a.zoo_spec["zoo"], **a.zoo_spec["kwargs"])
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())  # strict: same names, same shapes


def test_lenet5_macs_match_docstring():
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs.append(output[0].numel() * k)
        else:
            macs.append(module.in_features * module.out_features)

    model = build_model("lenet5")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    model(torch.zeros(1, 1, 28, 28))
    assert macs == [117_600, 240_000, 48_000, 10_080, 840]
    assert sum(macs) == 416_520
    assert [n for n, _ in model.named_children()][:2] == ["conv1", "conv2"]
    assert {"fc1", "fc2", "fc3"} <= dict(model.named_children()).keys()


def _adds(model):
    graph = torch.fx.symbolic_trace(model).graph
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]


def test_resnet_small_structure():
    model = build_model("resnet_small")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) >= 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)
    assert len(_adds(model)) == 3  # one residual add per block


def test_mobilenetv2_small_structure():
    model = build_model("mobilenetv2_small")
    depthwise = [m for m in model.modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert len(depthwise) == 5
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert len(_adds(model)) == 3  # stride-1 blocks with unchanged width


@pytest.mark.parametrize("name", ["resnet_small", "mobilenetv2_small"])
def test_width_multiplier_shrinks_and_grows(name):
    sizes = [n_params(build_model(name, width=w)) for w in (0.25, 0.5, 1.0, 2.0)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert build_model(name, width=0.5)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["lenet5", "lenet300"])
def test_lenet_image_size(name):
    model = build_model(name, in_channels=3, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_blocks_kwarg():
    model = build_model("resnet_small", blocks=2)
    assert len(model.layer2) == 2
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_list_models():
    assert set(CNN_MODELS + ["minilm"]) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_lists_available_names():
    with pytest.raises(ModelLoadError) as err:
        build_model("vgg99")
    assert "vgg99" in str(err.value)
    assert "lenet5" in err.value.hint and "minilm" in err.value.hint


def test_bad_kwarg_is_model_load_error():
    with pytest.raises(ModelLoadError, match="lenet5"):
        build_model("lenet5", depth=3)
    with pytest.raises(ModelLoadError, match="width"):
        build_model("resnet_small", width=0)


def test_zoo_import_does_not_import_transformers():
    code = ("import sys; from modelpress.zoo import build_model, load_dataset; build_model('lenet5'); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
