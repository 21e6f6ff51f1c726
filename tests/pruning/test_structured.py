"""prune.channels: exact widths, MACs and params, importance order, MAC targets, errors, save/load."""
import pytest
import torch
from torch import nn

from modelpress import Scope, get_method, prune
from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ConfigError, DataError, ScopeError
from modelpress.engine import MethodInputs, run_method
from modelpress.graph import build_channel_graph
from modelpress.pruning.structured import ChannelPruning, count_macs, iter_groups
from modelpress.zoo.models import build_model

SHAPE = [1, 1, 28, 28]
X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def run(model, cfg, data=None):
    pruned, report = run_method(model, cfg, MethodInputs(data=data))
    return pruned.eval(), report.info


def test_registered_as_structural():
    info = get_method("prune.channels")
    assert info.structural and info.config_cls is ChannelPruning


def test_lenet5_half_the_channels_exact_params_and_macs():
    model = build_model("lenet5")
    pruned, info = run(model, ChannelPruning(ratio=0.5, input_shape=SHAPE))
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.fc1.out_features,
            pruned.fc2.out_features, pruned.fc3.out_features) == (3, 8, 60, 42, 10)
    assert pruned.fc1.in_features == 8 * 5 * 5
    # conv1 3*28*28*25 + conv2 8*10*10*75 + fc1 200*60 + fc2 60*42 + fc3 42*10
    assert count_macs(pruned, X[:1]) == 58800 + 60000 + 12000 + 2520 + 420 == info["macs"][1]
    assert n_params(pruned) == 78 + 608 + 12060 + 2562 + 430 == info["params"][1]
    assert info["macs"][0] == 416520 and pruned(X).shape == (4, 10)
    assert model.conv1.out_channels == 6  # the input model is untouched
    assert info["skipped"] == [{"layer": "fc3", "reason": "feeds the model output"}]


@pytest.mark.parametrize("name, ratio, width", [("resnet_small", 0.25, 0.75), ("mobilenetv2_small", 0.5, 0.5)])
def test_pruned_zoo_model_equals_the_narrower_architecture(name, ratio, width):
    # uniform layer-wise pruning of every group gives exactly the zoo model at a smaller width
    pruned, info = run(build_model(name), ChannelPruning(ratio=ratio, input_shape=SHAPE))
    narrow = build_model(name, width=width)
    widths = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
    assert widths(pruned) == widths(narrow)
    assert info["params"][1] == n_params(narrow) and info["macs"][1] == count_macs(narrow, X[:1])
    assert pruned(X).shape == (4, 10)


@torch.no_grad()
def _kill_channels(model, graph, picks):
    """Zero everything that a few channels of each group own; returns {producers: channels}."""
    out = {}
    for g in graph.groups:
        if g.prunable_count() == 0:
            continue
        chans = picks(len(g))
        for m in g.members:
            for c in chans:
                for p in m.positions[c]:
                    if m.kind in ("out", "dw"):
                        m.module.weight[p] = 0
                    elif m.kind == "norm":
                        m.module.weight[p] = 0
                        m.module.bias[p] = 0
                    else:
                        m.module.weight[:, p] = 0
        out[tuple(g.producers)] = chans
    return out


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor"])
def test_zeroed_channels_are_pruned_first(importance):
    model = build_model("resnet_small").eval()
    killed = _kill_channels(model, build_channel_graph(model, X), lambda n: list(range(1, n, 4)))
    data = [(X, torch.tensor([0, 1, 2, 3]))]
    groups = list(iter_groups(model, X, ChannelPruning(ratio=0.25, importance=importance),
                              inputs=MethodInputs(data=data)))
    assert {tuple(g.producers): sorted(g.selected) for g in groups} == killed


def test_random_importance_is_seeded_and_differs_from_magnitude():
    model = build_model("lenet5")
    a = {tuple(g.producers): g.selected for g in iter_groups(model, X, ChannelPruning(ratio=0.5, importance="random"))}
    b = {tuple(g.producers): g.selected for g in iter_groups(model, X, ChannelPruning(ratio=0.5, importance="random"))}
    c = {tuple(g.producers): g.selected for g in iter_groups(model, X, ChannelPruning(ratio=0.5))}
    assert a == b and a != c and [len(v) for v in a.values()] == [len(v) for v in c.values()]


def test_target_macs_reduction_is_reached_on_resnet():
    model = build_model("resnet_small")
    pruned, info = run(model, ChannelPruning(target_macs_reduction=0.5, input_shape=SHAPE))
    reduction = 1 - count_macs(pruned, X[:1]) / count_macs(model, X[:1])
    assert 0.5 <= reduction < 0.56 and info["macs_reduction"] == pytest.approx(reduction)
    assert info["params"][1] < 0.6 * info["params"][0] and pruned(X).shape == (4, 10)


def test_global_ranking_removes_the_exact_total_and_round_to():
    model = build_model("resnet_small")
    _, info = run(model, ChannelPruning(ratio=0.3, ranking="global", input_shape=SHAPE))
    before = sum(g["channels"][0] for g in info["groups"])
    after = sum(g["channels"][1] for g in info["groups"])
    assert before - after == round(0.3 * before)
    _, info = run(model, ChannelPruning(ratio=0.3, round_to=8, input_shape=SHAPE))
    assert all(g["channels"][1] % 8 == 0 for g in info["groups"])


def test_min_channels_and_scope():
    pruned, _ = run(build_model("lenet5"), ChannelPruning(ratio=0.9, min_channels=4, input_shape=SHAPE))
    assert pruned.conv1.out_channels == 4 and pruned.conv2.out_channels == 4
    pruned, info = run(build_model("resnet_small"), ChannelPruning(
        ratio=0.5, scope=Scope(include=["re:layer.*conv1"]), input_shape=SHAPE))
    assert [g["layers"] for g in info["groups"]] == [["layer1.0.conv1"], ["layer2.0.conv1"], ["layer3.0.conv1"]]
    assert pruned.layer2[0].conv1.out_channels == 16 and pruned.layer2[0].conv2.out_channels == 32


def test_example_input_from_data_and_taylor():
    data = [(X, torch.tensor([0, 1, 2, 3]))]
    pruned, info = run(build_model("lenet5"), ChannelPruning(ratio=0.5, importance="taylor"), data)
    assert pruned.conv2.out_channels == 8 and pruned(X).shape == (4, 10)


def test_errors():
    with pytest.raises(ConfigError, match="ratio"):
        ChannelPruning(ratio=1.0)
    with pytest.raises(ConfigError, match="ratio"):
        ChannelPruning(ratio=-0.1)
    with pytest.raises(ConfigError, match="either ratio or target_macs_reduction"):
        ChannelPruning(ratio=0.2, target_macs_reduction=0.5)
    with pytest.raises(DataError, match="one example batch"):
        prune(build_model("lenet5"), ChannelPruning(ratio=0.5))
    with pytest.raises(DataError, match="taylor"):
        prune(build_model("lenet5"), ChannelPruning(ratio=0.5, importance="taylor", input_shape=SHAPE))
    with pytest.raises(ScopeError, match="conv9"):
        prune(build_model("lenet5"), ChannelPruning(scope=Scope(include=["conv9"]), input_shape=SHAPE))
    with pytest.raises(ScopeError, match="fc3: feeds the model output"):
        prune(build_model("lenet5"), ChannelPruning(scope=Scope(include=["fc3"]), input_shape=SHAPE))


def test_config_round_trips_with_target():
    cfg = ChannelPruning(target_macs_reduction=0.5, importance="bn_scale")
    assert ChannelPruning.from_dict(cfg.to_dict()) == cfg and cfg.ratio is None
    assert ChannelPruning().ratio == 0.5


@pytest.mark.parametrize("name", ["lenet5", "resnet_small", "mobilenetv2_small"])
def test_save_load_round_trip(name, tmp_path):
    pruned, _ = run(build_model(name), ChannelPruning(ratio=0.4, input_shape=SHAPE))
    path = save_artifact(pruned, tmp_path / f"{name}.safetensors")
    again, _ = load_artifact(path)  # rebuilt from the zoo name + the recorded layer shapes
    assert torch.equal(again(X), pruned(X))


class GroupedNet(nn.Module):
    """conv -> BN -> grouped conv -> BN -> ReLU -> conv -> pooled Linear, then a ResNeXt-like
    bottleneck (1x1, grouped 3x3, 1x1) around an identity shortcut."""

    def __init__(self, groups):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.gconv, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, groups=groups), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 24, 1)
        self.reduce = nn.Conv2d(24, 16, 1)
        self.split = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.expand = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.conv3(torch.relu(self.bn2(self.gconv(self.bn1(self.conv1(x))))))
        x = torch.relu(x + self.expand(torch.relu(self.split(torch.relu(self.reduce(x))))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _grouped_convs_stay_valid(model, groups):
    for conv in (model.gconv, model.split):
        assert conv.groups == groups and conv.in_channels % groups == 0 and conv.out_channels % groups == 0
        assert conv.weight.shape[1] == conv.in_channels // groups


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_convs_are_pruned_evenly(groups):
    model = GroupedNet(groups)
    pruned, info = run(model, ChannelPruning(ratio=0.5, input_shape=SHAPE))
    _grouped_convs_stay_valid(pruned, groups)
    assert (pruned.conv1.out_channels, pruned.gconv.out_channels, pruned.reduce.out_channels,
            pruned.split.out_channels, pruned.conv3.out_channels) == (8, 16, 8, 8, 12)
    assert pruned(X).shape == (4, 10) and info["params"][1] < info["params"][0]
    assert not info["skipped"][1:]  # only the output layer is left intact


@pytest.mark.parametrize("cfg", [ChannelPruning(ratio=0.3, round_to=8, input_shape=SHAPE),
                                 ChannelPruning(ratio=0.3, ranking="global", input_shape=SHAPE),
                                 ChannelPruning(target_macs_reduction=0.4, input_shape=SHAPE)])
def test_grouped_convs_stay_valid_under_round_to_global_and_mac_targets(cfg):
    pruned, info = run(GroupedNet(4), cfg)
    _grouped_convs_stay_valid(pruned, 4)
    assert pruned(X).shape == (4, 10) and info["params"][1] < info["params"][0]
    if cfg.round_to:
        assert all(g["channels"][1] % 8 == 0 for g in info["groups"])
