"""prune.heads on the attention of many transformer families (found by structure, not names),
grouped-query attention in both modes, Swin's per-head relative position bias, and torchvision's
Swin and torch.nn.MultiheadAttention through modelpress's WindowAttention and Attention."""
import pytest
import torch

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.hf import HFLogits, import_transformers
from modelpress.artifact.loading import load_artifact
from modelpress.engine import MethodInputs, run_method
from modelpress.pruning.heads import HeadPruning, find_blocks

pytestmark = pytest.mark.nlp
t = pytest.importorskip("transformers") and import_transformers()

IDS = torch.randint(1, 90, (2, 10), generator=torch.Generator().manual_seed(0))
TEXT = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
IMAGE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=96, vocab_size=100)

FAMILIES = {  # name: (build, inputs, heads, kv heads)
    "distilbert": (lambda: t.DistilBertForSequenceClassification(t.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)), TEXT, 4, 4),
    "albert": (lambda: t.AlbertForSequenceClassification(t.AlbertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        embedding_size=16)), TEXT, 4, 4),
    "vit": (lambda: t.ViTForImageClassification(t.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8)), IMAGE, 4, 4),
    "gpt2": (lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100)),
             {"input_ids": IDS}, 4, 4),
    "llama": (lambda: t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **LM)), {"input_ids": IDS}, 8, 2),
    "qwen2": (lambda: t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=2, **LM)), {"input_ids": IDS}, 8, 2),
    "mistral": (lambda: t.MistralForCausalLM(t.MistralConfig(num_key_value_heads=4, **LM)), {"input_ids": IDS}, 8, 4),
    "phi": (lambda: t.PhiForCausalLM(t.PhiConfig(**LM)), {"input_ids": IDS}, 8, 8),
}


def call(model, x):
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kv_heads", ["groups", "within"])
def test_heads_and_ffn_are_cut_exactly_and_reload(family, kv_heads, tmp_path):
    build, x, h, kv = FAMILIES[family]
    if kv == h and kv_heads == "within":
        pytest.skip("no grouped-query attention: both modes are the same")
    torch.manual_seed(0)
    model = HFLogits(build()).eval()
    before = call(model, x)
    pruned, report = run_method(model, HeadPruning(head_ratio=0.5, ffn_ratio=0.25, kv_heads=kv_heads),
                                MethodInputs(data=[x]))
    blocks = find_blocks(pruned)
    assert len(blocks) == 2 or family == "albert"  # ALBERT shares one layer across its depth
    for b in blocks:
        assert b.heads == h // 2
        assert b.kv_heads == (kv // 2 if kv_heads == "groups" or kv == h else kv)
        assert len(report.info["heads"][b.name]) == (2 if kv == h else 4)
    # the check against the original with the cut heads and neurons zeroed passed, and was tight
    assert report.info["check_max_abs_diff"] < 1e-4
    assert report.info["params"][1] < 0.9 * report.info["params"][0]
    after = call(pruned, x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    path = save_artifact(pruned, tmp_path / "m.safetensors")
    again, _ = load_artifact(path, base_model=model)
    torch.testing.assert_close(call(again, x), after, rtol=0, atol=1e-6)


def test_swin_relative_position_bias_loses_the_removed_heads(tmp_path):
    """Swin's per-head tensors (the relative position bias table, [(2W-1)^2, heads]) are cut with the
    heads; the check against the zeroed original and the reload hold."""
    model = HFLogits(t.SwinForImageClassification(t.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4))).eval()
    pruned, report = run_method(model, HeadPruning(head_ratio=0.5), MethodInputs(data=[IMAGE]))
    attn = pruned.hf.swin.encoder.layers[1].blocks[0].attention
    table = next(p for n, p in attn.named_parameters() if n.endswith("relative_position_bias_table"))
    assert attn.num_attention_heads == 2 and table.shape == (49, 2)
    assert report.info["check_max_abs_diff"] < 1e-4
    again, _ = load_artifact(save_artifact(pruned, tmp_path / "s.safetensors"), base_model=model)
    torch.testing.assert_close(call(again, IMAGE), call(pruned, IMAGE), rtol=0, atol=1e-6)


def test_torchvision_swin_heads_are_cut_through_window_attention():
    """torchvision's shifted_window_attention computes the head size as C // num_heads: prune.heads
    swaps in modelpress's WindowAttention (a stored head size), then cuts heads exactly."""
    pytest.importorskip("torchvision")
    from modelpress.artifact.loading import load_model

    model = load_model("torchvision:swin_t?num_classes=10").eval()
    pruned, report = run_method(model, HeadPruning(head_ratio=0.5), MethodInputs(data=[torch.randn(1, 3, 32, 32)]))
    assert report.info["heads"]["features.7.1"] == [24, 12] and report.info["check_max_abs_diff"] < 1e-4
    assert pruned.features[7][1].attn.relative_position_bias_table.shape == (169, 12)


def test_torch_multihead_attention_heads_are_cut_and_reload(tmp_path):
    """nn.MultiheadAttention packs q, k and v in one in_proj_weight: prune.heads swaps in the
    equivalent modelpress Attention (separate projections), cuts heads there, and the artifact reloads
    onto a fresh torch layer. The input layer keeps its MultiheadAttention."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    pruned, report = run_method(layer, HeadPruning(head_ratio=0.25), MethodInputs(data=[x]))
    assert report.info["heads"] == {"": [4, 3]}
    assert pruned.self_attn.num_heads == 3 and pruned.self_attn.q_proj.out_features == 24
    assert pruned.self_attn.out_proj.in_features == 24 and pruned(x).shape == x.shape
    assert isinstance(layer.self_attn, torch.nn.MultiheadAttention) and layer.self_attn.num_heads == 4
    again, _ = load_artifact(save_artifact(pruned, tmp_path / "m.safetensors"), base_model=layer)
    torch.testing.assert_close(again(x), pruned(x))


def test_timm_vision_transformer_fused_qkv(tmp_path):
    """timm's Attention: one fused qkv Linear, head count and width (attn_dim) read in forward."""
    pytest.importorskip("timm")
    from modelpress.artifact.loading import load_model

    model = load_model("timm:vit_tiny_patch16_224?img_size=32&patch_size=8").eval()
    x = torch.randn(2, 3, 32, 32)
    pruned, report = run_method(model, HeadPruning(head_ratio=0.34, ffn_ratio=0.25), MethodInputs(data=[x]))
    assert set(map(tuple, report.info["heads"].values())) == {(3, 2)}
    assert report.info["check_max_abs_diff"] < 1e-4
    assert pruned.blocks[0].attn.attn_dim == 128 and pruned.blocks[0].attn.qkv.out_features == 3 * 128
    again, _ = load_artifact(save_artifact(pruned, tmp_path / "v.safetensors"))
    torch.testing.assert_close(call(again, x), call(pruned, x), rtol=0, atol=1e-6)
