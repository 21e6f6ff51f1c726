"""Dependency groups: which channels are coupled, what is skipped, and exact removal."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.errors import UnsupportedError
from modelpress.graph import build_channel_graph
from modelpress.zoo.models import build_model

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def groups_by_producer(graph):
    return {tuple(g.producers): g for g in graph.groups}


@torch.no_grad()
def kill(group, channels):
    """Make ``channels`` of ``group`` output exactly zero everywhere (weights, biases, BN affine)."""
    for m in group.members:
        for c in channels:
            for p in m.positions[c]:
                if m.kind in ("out", "dw", "norm"):
                    m.module.weight[p] = 0
                    if m.module.bias is not None:
                        m.module.bias[p] = 0


def assert_removal_is_exact(model, x, pick=lambda g: list(range(0, g.prunable_count(), 3))):
    """Zero some channels of every prunable group, prune exactly those: the output must not change."""
    model.eval()
    graph = build_channel_graph(model, x)
    chosen = {}
    for g in graph.groups:
        if g.prunable_count() > 1:
            chosen[g] = [c for c in pick(g) if g.unprunable_reason(c) is None]
            kill(g, chosen[g])
    with torch.no_grad():
        before = model(x)
    for g, idx in chosen.items():
        g.prune(idx)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    return chosen


def test_resnet_residual_add_couples_block_output_and_shortcut():
    model = build_model("resnet_small")
    graph = build_channel_graph(model, X)
    by = groups_by_producer(graph)
    assert set(by) == {("conv1", "layer1.0.conv2"), ("layer1.0.conv1",),
                       ("layer2.0.downsample.0", "layer2.0.conv2"), ("layer2.0.conv1",),
                       ("layer3.0.downsample.0", "layer3.0.conv2"), ("layer3.0.conv1",), ("fc",)}
    stream = by[("layer2.0.downsample.0", "layer2.0.conv2")]
    assert len(stream) == 32 and stream.prunable_count() == 32
    labels = {m.axis.label for m in stream.members}
    assert labels == {"layer2.0.downsample.0.out", "layer2.0.downsample.1", "layer2.0.conv2.out", "layer2.0.bn2",
                      "layer3.0.conv1.in", "layer3.0.downsample.0.in"}
    # identity shortcut of layer1: the stem's channels are the block's output channels
    assert {"conv1.out", "bn1", "layer1.0.conv2.out", "layer1.0.bn2", "layer1.0.conv1.in"} <= \
        {m.axis.label for m in by[("conv1", "layer1.0.conv2")].members}
    assert by[("fc",)].prunable_count() == 0
    assert graph.skipped == [{"layer": "fc", "reason": "feeds the model output"}]


def test_resnet_removal_is_exact_across_residual_adds():
    model = build_model("resnet_small")
    chosen = assert_removal_is_exact(model, X)
    assert model.layer2[0].conv2.out_channels == model.layer2[0].downsample[0].out_channels == 32 - 11
    assert model.layer3[0].conv1.in_channels == 32 - 11 and model.fc.in_features == 64 - 22
    assert sum(len(v) for v in chosen.values()) == 6 + 6 + 11 + 11 + 22 + 22


def test_mobilenet_depthwise_conv_is_pruned_with_its_producer():
    model = build_model("mobilenetv2_small")
    graph = build_channel_graph(model, X)
    by = groups_by_producer(graph)
    expand = by[("features.2.conv.0.0",)]
    kinds = {m.axis.label: m.kind for m in expand.members}
    assert kinds == {"features.2.conv.0.0.out": "out", "features.2.conv.0.1": "norm", "features.2.conv.1.0": "dw",
                     "features.2.conv.1.1": "norm", "features.2.conv.2.in": "in"}
    # the residual stream of stage 2 couples both blocks' projections
    assert len(by[("features.2.conv.2", "features.3.conv.2")]) == 24
    assert_removal_is_exact(model, X)
    dw = model.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels == 64 - 22
    assert model(X).shape == (2, 10)


class ConcatNet(nn.Module):
    """Two branches concatenated, a residual add on the concat, then a 1x1 conv and a classifier."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(1, 10, 3, padding=1)
        self.c = nn.Conv2d(1, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 7 * 7, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = self.bn(y + self.c(x))
        y = F.max_pool2d(F.relu(self.mix(y)), 4)
        return self.fc(y.flatten(1))


def test_concat_offsets_and_residual_on_concat():
    model = ConcatNet()
    graph = build_channel_graph(model, X)
    (group,) = [g for g in graph.groups if "c" in g.producers]
    assert sorted(group.producers) == ["a", "b", "c"] and len(group) == 16
    mix = next(m for m in group.members if m.axis.label == "mix.in")
    assert mix.positions[0] == [0] and mix.positions[6] == [6]  # b's first channel sits at offset 6
    group.prune([0, 5, 6, 15])  # two of a, two of b
    assert (model.a.out_channels, model.b.out_channels, model.c.out_channels) == (4, 8, 12)
    assert model.bn.num_features == 12 and model.mix.in_channels == 12


def test_concat_and_flatten_removal_is_exact():
    model = ConcatNet()
    assert_removal_is_exact(model, X)
    assert model.fc.in_features == (8 - 3) * 49  # each mix channel was 7*7 inputs of fc


def test_lenet_flatten_maps_each_channel_to_its_spatial_block():
    model = build_model("lenet5")
    graph = build_channel_graph(model, X)
    g = groups_by_producer(graph)[("conv2",)]
    fc1 = next(m for m in g.members if m.axis.label == "fc1.in")
    assert fc1.positions[3] == list(range(75, 100))
    assert_removal_is_exact(model, X)
    assert model.conv2.out_channels == 10 and model.fc1.in_features == 250


class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.roll(self.conv2(x), 1, dims=1)  # mixes channel order: conv2 cannot be pruned
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_unknown_op_skips_only_the_affected_layer_and_names_it():
    model = Rolled()
    graph = build_channel_graph(model, X)
    skipped = {s["layer"]: s["reason"] for s in graph.skipped}
    assert set(skipped) == {"conv2", "fc"}
    assert "roll" in skipped["conv2"] and "test_groups.py" in skipped["conv2"]
    chosen = assert_removal_is_exact(model, X)
    assert model.conv2.out_channels == 8 and model.conv2.in_channels == 8 - 3
    assert model.conv3.out_channels == 8 - 3 and len(chosen) == 2


class Shuffle(nn.Module):
    """Channel shuffle (ShuffleNet): a view that mixes the channel dim."""

    def __init__(self, hard_coded_flatten=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 24 * 24, 2)
        self.hard = hard_coded_flatten

    def forward(self, x):
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        x = self.conv2(x)
        return self.fc(x.view(-1, 8 * 24 * 24) if self.hard else x.view(x.size(0), -1))


def test_view_mixing_channels_and_hard_coded_flatten_are_skipped():
    graph = build_channel_graph(Shuffle(), X)
    skipped = {s["layer"]: s["reason"] for s in graph.skipped}
    assert "mixes the channel dim" in skipped["conv1"]
    assert "conv2" not in skipped  # x.view(x.size(0), -1) is a plain flatten
    graph = build_channel_graph(Shuffle(hard_coded_flatten=True), X)
    assert "hard-codes 4608" in {s["layer"]: s["reason"] for s in graph.skipped}["conv2"]


def test_grouped_conv_and_layernorm_are_boundaries():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 24 * 24, 16),
                          nn.LayerNorm(16), nn.Linear(16, 2))
    graph = build_channel_graph(model, X)
    skipped = {s["layer"]: s["reason"] for s in graph.skipped}
    assert "grouped Conv '1'" in skipped["0"] and "LayerNorm" in skipped["3"]
    assert all(g.prunable_count() == 0 for g in graph.groups)


def test_untraceable_model_names_the_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(UnsupportedError, match=r"test_groups.py:\d+ `if x.sum\(\) > 0:"):
        build_channel_graph(Branchy(), torch.randn(2, 4))


def test_group_refuses_to_cut_protected_or_every_channel():
    graph = build_channel_graph(build_model("lenet5"), X)
    by = groups_by_producer(graph)
    with pytest.raises(UnsupportedError, match="feeds the model output"):
        by[("fc3",)].prune([0])
    with pytest.raises(UnsupportedError, match="every channel of 'conv1'"):
        by[("conv1",)].prune(range(6))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: the gate's last layer is coupled to the gated conv by a multiply."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 12, 3, padding=1)
        self.squeeze = nn.Linear(12, 4)
        self.excite = nn.Linear(4, 12)
        self.head = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.conv(x))
        b, c = x.shape[:2]
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3))))))
        x = x * gate.view(b, c, 1, 1)
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


def test_squeeze_excite_gate_is_coupled_to_the_gated_channels():
    model = SqueezeExcite()
    by = groups_by_producer(build_channel_graph(model, X))
    assert set(by) == {("conv", "excite"), ("squeeze",), ("head",), ("fc",)}
    assert_removal_is_exact(model, X)
    assert model.conv.out_channels == model.excite.out_features == model.squeeze.in_features == 8
