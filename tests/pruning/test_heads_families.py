"""prune.heads on the attention of many transformer families (found by structure, not names),
grouped-query attention in both modes, and a clean refusal where it cannot cut (Swin's per-head
bias, torch.nn.MultiheadAttention)."""
import pytest
import torch

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.hf import HFLogits, import_transformers
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import UnsupportedError
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


def test_per_head_tensors_are_refused_not_cut_wrong():
    model = HFLogits(t.SwinForImageClassification(t.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)))
    with pytest.raises(UnsupportedError, match="relative_position_bias_table"):
        run_method(model, HeadPruning(head_ratio=0.5), MethodInputs(data=[IMAGE]))


def test_torch_multihead_attention_is_refused_with_a_reason():
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    with pytest.raises(UnsupportedError, match="no transformer attention"):
        run_method(layer, HeadPruning(), MethodInputs(data=[torch.randn(2, 5, 32)]))


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
