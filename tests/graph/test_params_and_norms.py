"""Channels that reach parameters of the model and LayerNorms: ConvNeXt's layer scale and
LayerNorm2d, a class token and a position embedding, stochastic depth (issue 15)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.compat import prepare_torchvision
from modelpress.engine import MethodInputs, run_method
from modelpress.graph import build_channel_graph
from modelpress.pruning.structured import ChannelPruning


class LayerNorm2d(nn.LayerNorm):
    """torchvision's and timm's form: channels-first input, F.layer_norm over the channels."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """A ConvNeXt block: depthwise conv, LayerNorm over channels-last, MLP, layer scale, residual."""

    def __init__(self, dim):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class TinyConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16))
        self.stage1 = nn.Sequential(Block(16), Block(16))
        self.down = nn.Sequential(LayerNorm2d(16), nn.Conv2d(16, 32, 2, stride=2))
        self.stage2 = Block(32)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(32), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))))


class TinyViT(nn.Module):
    """Patch embedding, a class token concatenated along the tokens, a position embedding, an MLP
    block and mean pooling: the channels reach three parameters of the root module."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim))
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(dim=1))


X = torch.randn(2, 3, 32, 32)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_convnext_layer_scale_and_layernorm2d_join_the_residual_stream_group():
    model = TinyConvNeXt().eval()
    graph = build_channel_graph(model, X)
    assert graph.skipped == [{"layer": "head.3", "reason": "feeds the model output"}]
    stream = next(g for g in graph.groups if "stem.0" in g.producers)
    labels = {m.axis.label: m.kind for m in stream.members}
    assert labels["stage1.0.layer_scale"] == "param:layer_scale:0"
    assert labels["stem.1.weight"] == "param:weight:0" and labels["stem.1.bias"] == "param:bias:0"
    assert labels["stage1.0.norm"] == "ln" and "down.0.weight" in labels
    assert stream.prunable_count() == 16


@pytest.mark.parametrize("model_cls", [TinyConvNeXt, TinyViT])
def test_pruned_parameters_and_norms_run_and_reload(model_cls, tmp_path):
    torch.manual_seed(0)
    model = model_cls().eval()
    small, report = run_method(model, ChannelPruning(ratio=0.5, input_shape=[1, 3, 32, 32]))
    kept = n_params(small) / n_params(model)
    assert kept < 0.5, kept  # every width halves (inputs, outputs and token counts stay)
    with torch.no_grad():
        out = small(X)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    path = save_artifact(small, tmp_path / "m.safetensors")
    again, _ = load_artifact(path, base_model=model)
    with torch.no_grad():
        torch.testing.assert_close(again(X), out)
    assert n_params(again) == n_params(small)


def test_vit_class_token_and_position_embedding_are_sliced():
    model = TinyViT().eval()
    small, _ = run_method(model, ChannelPruning(ratio=0.25, input_shape=[1, 3, 32, 32]))
    assert small.cls_token.shape == (1, 1, 12) and small.pos.shape == (1, 17, 12)
    assert small.norm.normalized_shape == (12,) and small.fc1.out_features == 24


def test_stochastic_depth_passes_the_channels():
    prepare_torchvision()  # the CPU torch here cannot load torchvision's compiled ops (see README)
    tv_ops = pytest.importorskip("torchvision.ops")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 2)

        def forward(self, x):
            x = self.a(x)
            x = x + tv_ops.stochastic_depth(self.b(x), 0.1, "row", self.training)
            return self.head(x.mean((2, 3)))

    graph = build_channel_graph(Net().eval(), X)
    assert graph.skipped == [{"layer": "head", "reason": "feeds the model output"}]
    assert [g.prunable_count() for g in graph.groups if "a" in g.producers] == [8]


class TimmLinear(nn.Linear):
    """timm's form: a Linear subclass computing through F.linear (not a module fx keeps whole)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's form: F.batch_norm on its own statistics, then an activation channel by channel."""

    def __init__(self, n):
        super().__init__(n)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(x)


class TimmStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), BatchNormAct2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)  # layer scale kept as [C], viewed as [1, C, 1, 1]
        self.fc, self.head = TimmLinear(16, 32), TimmLinear(32, 5)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = x + self.conv2(x).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def test_timm_style_subclasses_and_a_reshaped_layer_scale_are_pruned_and_reload(tmp_path):
    torch.manual_seed(0)
    model, x = TimmStyle().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
    pruned, report = run_method(model, ChannelPruning(ratio=0.5), MethodInputs(data=[x]))
    assert [s["reason"] for s in report.info["skipped"]] == ["feeds the model output"]
    assert pruned.bn1.num_features == 8 and pruned.bn1.running_mean.shape == (8,) and pruned.gamma.shape == (8,)
    assert pruned.fc.in_features == 8 and pruned.fc.out_features == 16 and pruned.head.in_features == 16
    with torch.no_grad():
        out = pruned(x)
    again, _ = load_artifact(save_artifact(pruned, tmp_path / "t.safetensors"), base_model=model)
    assert type(again.bn1) is BatchNormAct2d and again.bn1.num_features == 8
    with torch.no_grad():
        torch.testing.assert_close(again(x), out)


class GRN(nn.Module):
    """ConvNeXt V2's global response norm (timm's form, channels last): an L2 norm per channel over
    the spatial dims, divided by its mean over the channels, then a per-channel scale and shift."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim))
        self.bias = nn.Parameter(torch.rand(dim))

    def forward(self, x):
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias, self.weight, x * x_n)


class GRNNet(nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.fc1, self.grn, self.fc2 = nn.Linear(dim, hidden), GRN(hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.fc2(self.grn(F.gelu(self.fc1(x))))
        return self.head(x.mean((1, 2)))


def test_global_response_norm_hidden_width_is_pruned():
    """The MLP's hidden width goes through GRN (timm's convnextv2_atto kept 0.69 of its parameters
    at ratio 0.3 when Tensor.norm / addcmul stopped the graph; 0.515 with this rule)."""
    torch.manual_seed(0)
    model = GRNNet().eval()
    small, report = run_method(model, ChannelPruning(ratio=0.5, input_shape=[1, 3, 32, 32]))
    assert small.fc1.out_features == small.grn.weight.numel() == small.grn.bias.numel() == small.fc2.in_features == 16
    with torch.no_grad():
        assert small(X).shape == (2, 10) and torch.isfinite(small(X)).all()


class TimmSwinLike(nn.Module):
    """timm's Swin shapes: ``B, H, W, C = x.shape`` sizes the window views of the attention output,
    a cyclic shift by torch.roll, and patch merging that folds a 2x2 neighbourhood into the channels
    by reshape + permute + flatten (torchvision concatenates instead)."""

    def __init__(self, dim=16, win=2):
        super().__init__()
        self.win = win
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.merge_norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim)
        self.head = nn.Linear(2 * dim, 10)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        shifted = torch.roll(self.norm1(x), shifts=(-1, -1), dims=(1, 2))
        windows = shifted.view(B, H // self.win, self.win, W // self.win, self.win, C).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(-1, self.win * self.win, C)
        out = self.proj(windows)
        out = out.view(B, H // self.win, W // self.win, self.win, self.win, C).permute(0, 1, 3, 2, 4, 5)
        out = torch.roll(out.reshape(B, H, W, C), shifts=(1, 1), dims=(1, 2))
        x = x + out
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.reduction(self.merge_norm(x))
        return self.head(x.mean((1, 2)))


def test_timm_swin_shapes_roll_views_sized_by_the_stream_and_patch_merging(tmp_path):
    """timm swin_tiny kept 0.72 of its parameters at ratio 0.3 (torch.roll, the attention output
    viewed with the block input's width, patch merging by flatten all stopped the stream); 0.49 now."""
    torch.manual_seed(0)
    model = TimmSwinLike().eval()
    graph = build_channel_graph(model, X)
    assert graph.skipped == [{"layer": "head", "reason": "feeds the model output"}]
    small, _ = run_method(model, ChannelPruning(ratio=0.5, input_shape=[1, 3, 32, 32]))
    assert small.embed.out_channels == small.proj.out_features == small.norm1.weight.numel() == 8
    assert small.merge_norm.weight.numel() == small.reduction.in_features == 32  # 4 positions x 8 channels
    with torch.no_grad():
        out = small(X)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    again, _ = load_artifact(save_artifact(small, tmp_path / "s.safetensors"), base_model=model)
    with torch.no_grad():
        torch.testing.assert_close(again(X), out)
