"""torchvision's Swin (V1 and V2) through modelpress's WindowAttention: exact conversion (padding,
cyclic shift and its mask, relative position bias, V2's cosine attention and position MLP), then
structured pruning of the hidden width and the heads through the exported graph, with reload."""
import pytest
import torch

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.compat import prepare_torchvision
from modelpress.engine import MethodInputs, run_method
from modelpress.nn.window_attention import WindowAttention, convert_window_attention
from modelpress.pruning.heads import HeadPruning
from modelpress.pruning.structured import ChannelPruning

X = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))  # 10 x 14 patches: padded windows


def tiny_swin(v2: bool):
    prepare_torchvision()  # the CPU torch here cannot load torchvision's compiled ops (see README)
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    torch.manual_seed(0)
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                 window_size=[4, 4], num_classes=10, **extra).eval()
    with torch.no_grad():  # non-trivial position biases (torchvision starts them near zero)
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "cpb_mlp" in name or "logit_scale" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.mark.parametrize("v2", [False, True])
def test_conversion_is_exact(v2):
    model = tiny_swin(v2)
    with torch.no_grad():
        ref = model(X)
        names = convert_window_attention(model)
        out = model(X)
    assert names == ["features.1.0.attn", "features.1.1.attn", "features.3.0.attn", "features.3.1.attn"]
    assert all(isinstance(model.get_submodule(n), WindowAttention) for n in names)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("v2", [False, True])
def test_channels_and_heads_are_pruned_and_reload(v2, tmp_path):
    model = tiny_swin(v2)
    pruned, report = run_method(model, ChannelPruning(ratio=0.5), MethodInputs(data=[X]))
    assert report.info["capture"] == "export"
    assert report.info["heads"]["features.3.0"] == [4, 2]
    attn = pruned.features[3][0].attn
    assert isinstance(attn, WindowAttention) and attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * 8
    assert attn.qkv.in_features == attn.proj.out_features == 16  # the stage's hidden width: 32 -> 16
    per_head = attn.cpb_out if v2 else attn.relative_position_bias_table
    assert 2 in per_head.shape
    assert n_params(pruned) / n_params(model) < 0.4
    assert type(model.features[1][0].attn).__name__.startswith("ShiftedWindowAttention")  # input untouched
    with torch.no_grad():
        out = pruned(X)
    assert out.shape == (2, 10)
    again, _ = load_artifact(save_artifact(pruned, tmp_path / "s.safetensors"), base_model=model)
    with torch.no_grad():
        torch.testing.assert_close(again(X), out)


def test_head_pruning_computes_the_model_with_those_heads_removed():
    model = tiny_swin(True)
    pruned, report = run_method(model, HeadPruning(head_ratio=0.5, ffn_ratio=0.25), MethodInputs(data=[X]))
    assert report.info["heads"] == {f"features.{s}.{i}": [h, h // 2] for s, h in ((1, 2), (3, 4)) for i in (0, 1)}
    assert report.info["check_max_abs_diff"] < 1e-4
    assert pruned.features[1][0].attn.logit_scale.shape == (1, 1, 1)


@pytest.mark.parametrize("v2", [False, True])
def test_quantization_calls_the_converted_projections(v2):
    from modelpress.quantization.adaround import AdaRound
    from modelpress.quantization.modules import QuantLinear
    from modelpress.quantization.primitives import sqnr

    model = tiny_swin(v2)
    batches = [(X, torch.zeros(2, dtype=torch.long))]
    q, report = run_method(model, AdaRound(bits=8, iterations=5), MethodInputs(data=batches))
    attn = q.get_submodule("features.1.0.attn")
    assert isinstance(attn, WindowAttention) and isinstance(attn.proj, QuantLinear)
    learned = set(report.info["layers"])
    assert "features.1.0.attn.proj" in learned  # torchvision's F.linear on proj.weight: never observed
    # V2 leaves its key bias out with F.linear on qkv.weight: that layer is rounded to nearest
    assert ("features.1.0.attn.qkv" in learned) != v2
    with torch.no_grad():
        assert sqnr(model(X), q(X)) > 25


@pytest.mark.parametrize("v2", [False, True])
def test_static_int8_through_the_converted_attention_reloads(v2, tmp_path):
    from modelpress.quantization.static import StaticInt8

    model = tiny_swin(v2)
    q, _ = run_method(model, StaticInt8(), MethodInputs(data=[(X, torch.zeros(2, dtype=torch.long))]))
    # its spec read qkv.in_features, which the quantized wrapper does not have (a raw AttributeError)
    again, _ = load_artifact(save_artifact(q, tmp_path / "q.safetensors"), base_model=tiny_swin(v2))
    with torch.no_grad():
        torch.testing.assert_close(again(X), q(X))


def test_timm_linear_is_a_linear_to_dynamic_int8():
    prepare_torchvision()
    layers = pytest.importorskip("timm.layers")
    from modelpress.quantization.dynamic import DynamicInt8, DynamicInt8Linear

    model = torch.nn.Sequential(layers.Linear(8, 8), torch.nn.ReLU(), layers.Linear(8, 4)).eval()
    q, report = run_method(model, DynamicInt8(), MethodInputs())
    assert isinstance(q[0], DynamicInt8Linear) and isinstance(q[2], DynamicInt8Linear)


def tiny_maxvit():
    prepare_torchvision()
    maxvit = pytest.importorskip("torchvision.models.maxvit")
    torch.manual_seed(0)
    model = maxvit.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                          block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def test_maxvit_partition_attention_converts_exactly_and_prunes_like_a_cnn(tmp_path):
    from modelpress.nn.window_attention import PartitionAttention

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = tiny_maxvit()
    with torch.no_grad():
        ref = model(x)
        names = convert_window_attention(model)
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)
    assert len(names) == 4 and all(isinstance(model.get_submodule(n), PartitionAttention) for n in names)

    model = tiny_maxvit()
    batches = [(x, torch.zeros(2, dtype=torch.long))]
    pruned, report = run_method(model, ChannelPruning(ratio=0.5), MethodInputs(data=batches))
    attn = pruned.get_submodule(names[0])
    assert attn.num_heads == 1 and attn.to_qkv.in_features < 16  # heads and the residual width went
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(pruned) < 0.45 * n_params(model)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == ref.shape
    again, _ = load_artifact(save_artifact(pruned, tmp_path / "maxvit.safetensors"), base_model=tiny_maxvit())
    with torch.no_grad():
        assert torch.equal(again(x), out)
