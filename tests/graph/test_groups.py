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


class GroupMix(nn.Module):
    """A view into (groups, channels per group) followed by a sum over the groups: channels mix."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        x = self.conv1(x)
        b, c, h, w = x.shape
        return self.conv2(x.view(b, 2, c // 2, h, w).sum(1))


def test_view_mixing_channels_and_hard_coded_flatten_are_skipped():
    graph = build_channel_graph(GroupMix(), X)
    skipped = {s["layer"]: s["reason"] for s in graph.skipped}
    assert "reads channels viewed as (groups, channels per group)" in skipped["conv1"]
    graph = build_channel_graph(Shuffle(), X)
    skipped = {s["layer"]: s["reason"] for s in graph.skipped}
    assert "conv1" not in skipped and "conv2" not in skipped  # x.view(x.size(0), -1) is a plain flatten
    graph = build_channel_graph(Shuffle(hard_coded_flatten=True), X)
    assert "hard-codes 4608" in {s["layer"]: s["reason"] for s in graph.skipped}["conv2"]


def test_channel_shuffle_ties_channel_j_of_every_group_and_removal_is_exact():
    model = Shuffle()
    graph = build_channel_graph(model, X)
    (group,) = [g for g in graph.groups if g.producers == ["conv1"]]
    assert len(group) == 4  # 8 channels in 2 rows: column j of both rows goes together
    conv2_in = next(m for m in group.members if m.axis.label == "conv2.in")
    assert conv2_in.positions[1] == [2, 3]  # after the shuffle, channels 1 and 5 sit at 2 and 3
    assert_removal_is_exact(Shuffle(), X, pick=lambda g: [1, 2])
    model = Shuffle()
    assert_removal_is_exact(model, X, pick=lambda g: [1, 2])
    assert (model.conv1.out_channels, model.conv2.in_channels) == (4, 4)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's two blocks: split in halves, one branch, concatenate, shuffle; and the
    downsampling block with two branches on the whole input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1))
        self.right = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, 2, 1, groups=6),
                                   nn.BatchNorm2d(6), nn.Conv2d(6, 6, 1))
        self.branch = nn.Sequential(nn.Conv2d(6, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 1))
        self.head = nn.Conv2d(12, 5, 1)

    @staticmethod
    def shuffle(x, groups=2):
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, -1, h, w)

    def forward(self, x):
        x = self.stem(x)
        x = self.shuffle(torch.cat((self.left(x), self.right(x)), dim=1))
        x1, x2 = x.chunk(2, dim=1)
        x = self.shuffle(torch.cat((x1, self.branch(x2)), dim=1))
        return self.head(x).mean((2, 3))


def test_shufflenet_split_concat_and_shuffle_prune_exactly():
    model = ShuffleUnit()
    graph = build_channel_graph(model, X)
    assert graph.skipped == [{"layer": "head", "reason": "feeds the model output"}]
    assert_removal_is_exact(model, X, pick=lambda g: [0, 2])
    # the stage's 12 channels are 3 channels of 4 (the shuffle pairs left j with right j, the halves
    # position j with j + 6); two went
    assert (model.left[2].out_channels, model.right[4].out_channels, model.head.in_channels) == (2, 2, 4)
    assert model.branch[2].out_channels == 2 and model.branch[0].in_channels == 2


class Chunks(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.how = how

    def forward(self, x):
        x = self.conv(x)
        a, b = x.split(4, dim=1) if self.how == "split" else x.chunk(2, dim=1)
        return a * b


def test_chunk_keeps_its_pieces_equal_and_a_fixed_split_is_skipped():
    graph = build_channel_graph(Chunks("chunk"), X)
    assert len(next(g for g in graph.groups if g.producers == ["conv"])) == 4
    graph = build_channel_graph(Chunks("split"), X)
    assert "cuts the channel dim into pieces of fixed size" in graph.skipped[0]["reason"]


class WithAuxiliary(nn.Module):
    """GoogLeNet's form: an auxiliary classifier that runs only in training reads a conv's channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
        self.out = nn.Conv2d(8, 3, 26)

    def forward(self, x):
        x = self.conv(x)
        y = self.out(x).flatten(1)
        return (y, self.aux(x)) if self.training else y


def test_layers_that_run_only_in_training_are_cut_with_their_inputs():
    model = WithAuxiliary().eval()
    graph = build_channel_graph(model, X)
    assert not model.training  # traced in training mode, given back as it came
    (group,) = [g for g in graph.groups if g.producers == ["conv"]]
    group.prune([0, 1, 2])
    assert model.aux[0].in_channels == 5 == model.out.in_channels
    model.train()
    y, aux = model(X)
    assert y.shape == (2, 3) and aux.shape == (2, 3)


def test_layernorm_over_the_channels_is_pruned_with_them():
    """A LayerNorm over the channel dim alone loses the channels its producer loses (width pruning of
    transformers); one normalising the channels together with other dims stays a boundary."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 26 * 26, 16), nn.LayerNorm(16),
                          nn.Linear(16, 2))
    graph = build_channel_graph(model, X)
    group = groups_by_producer(graph)[("2",)]
    assert group.prunable_count() == 16 and {m.name: m.kind for m in group.members}["3"] == "ln"
    group.prune(range(0, 16, 2))
    assert model[3].normalized_shape == (8,) and model[3].weight.shape == (8,) and model[4].in_features == 8
    assert model(X).shape == (X.shape[0], 2)

    whole = nn.Sequential(nn.Conv2d(1, 8, 3), nn.LayerNorm([8, 26, 26]), nn.Flatten(), nn.Linear(8 * 26 * 26, 2))
    skipped = {s["layer"]: s["reason"] for s in build_channel_graph(whole, X).skipped}
    assert "normalises over the channels and other dims together" in skipped["0"]


def grouped_net(groups):
    """conv -> BN -> grouped conv -> BN -> ReLU -> conv -> pooled Linear."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16),
                         nn.Conv2d(16, 24, 3, padding=1, groups=groups), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


class ResNeXtBlock(nn.Module):
    """Stem, then a bottleneck whose middle 3x3 is grouped, with an identity shortcut."""

    def __init__(self, width=16, groups=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(12, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.split = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups), nn.BatchNorm2d(width),
                                   nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(width, 12, 1), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.expand(self.split(self.reduce(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def every_third_unit(group):
    """Valid picks for a group tied by a grouped conv: whole units (one channel per cell)."""
    units = group.removal_units(torch.arange(len(group), dtype=torch.float))
    return sorted(c for u in units[::3] for c in u)


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_ties_its_producer_and_its_outputs_per_conv_group(groups):
    model = grouped_net(groups)
    by = groups_by_producer(build_channel_graph(model, X))
    (into,), (out,) = by[("0",)].ties, by[("2",)].ties
    # the producer's channel i feeds conv group i // (16 / groups); the outputs split the same way
    assert into.cells == [list(range(j * 16 // groups, (j + 1) * 16 // groups)) for j in range(groups)]
    assert out.cells == [list(range(j * 24 // groups, (j + 1) * 24 // groups)) for j in range(groups)]
    assert into.convs == ["2.in"] and out.convs == ["2.out"] and into.problem is None is out.problem
    assert by[("0",)].prunable_count() == 16 and by[("2",)].prunable_count() == 24
    units = by[("0",)].removal_units(torch.arange(16.0))
    assert len(units) == 16 // groups and all(len(u) == groups for u in units)
    with pytest.raises(UnsupportedError, match="unequal input widths"):
        by[("0",)].prune([0])  # one channel from one conv group only


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_removal_is_exact(groups):
    model = grouped_net(groups)
    chosen = assert_removal_is_exact(model, X, pick=every_third_unit)
    conv = model[2]
    assert conv.groups == groups and conv.in_channels % groups == 0 and conv.out_channels % groups == 0
    assert conv.in_channels == 16 - len(chosen[next(g for g in chosen if g.producers == ["0"])])
    assert conv.in_channels < 16 and conv.out_channels < 24 and model[3].num_features == conv.out_channels
    assert conv.weight.shape[1] == conv.in_channels // groups


def test_resnext_block_removal_is_exact_across_the_grouped_conv_and_the_add():
    model = ResNeXtBlock()
    graph = build_channel_graph(model, X)
    by = groups_by_producer(graph)
    assert set(by) == {("stem.0", "expand.0"), ("reduce.0",), ("split.0",), ("fc",)}
    assert [len(t.cells) for t in by[("reduce.0",)].ties] == [4] and not by[("stem.0", "expand.0")].ties
    assert_removal_is_exact(model, X, pick=every_third_unit)
    split = model.split[0]
    assert split.groups == 4 and split.in_channels == split.out_channels == 16 - 8
    assert model.reduce[0].out_channels == 8 and model.expand[0].in_channels == 8
    assert model.stem[0].out_channels == model.expand[0].out_channels == model.fc.in_features == 12 - 4


class UnevenGroups(nn.Module):
    """A grouped conv reading two layers' channels, one per conv group; a depthwise multiplier."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        y = self.grouped(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(F.adaptive_avg_pool2d(self.dw2(F.relu(y)), 1).flatten(1))


def test_grouped_conv_reading_other_layers_unevenly_is_skipped():
    model = UnevenGroups()
    graph = build_channel_graph(model, X)
    skipped = {s["layer"]: s["reason"] for s in graph.skipped}
    # a alone fills conv group 0: removing from a without b would unbalance the groups
    assert "grouped Conv 'grouped' (groups=2) cannot keep its groups equally wide" in skipped["a"]
    assert "cannot keep" in skipped["b"]
    assert "one channel per group" in skipped["grouped"]  # its inputs could only go all at once
    by = groups_by_producer(graph)
    assert by[("dw2",)].prunable_count() == 16  # 2 outputs per group: one of each may go
    assert [len(u) for u in by[("dw2",)].removal_units(torch.zeros(16))] == [8, 8]  # a budget keeps one
    assert_removal_is_exact(model, X, pick=every_third_unit)
    assert model.dw2.out_channels == 8 and model.dw2.groups == 8 and model.fc.in_features == 8


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
