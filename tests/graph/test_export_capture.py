"""Structured pruning of models torch.fx cannot trace, through torch.export (issue 15): the hidden
width of Hugging Face transformers (embeddings, norms, every projection on the residual stream,
tied output embeddings), their FFN neurons and heads, and what fx keeps whole (nn.TransformerEncoder)."""
import pytest
import torch
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.hf import HFLogits, import_transformers
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import UnsupportedError
from modelpress.engine import MethodInputs, run_method
from modelpress.graph import build_channel_graph
from modelpress.pruning.structured import ChannelPruning

IDS = torch.randint(1, 90, (2, 10), generator=torch.Generator().manual_seed(0))
LM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=96, vocab_size=100)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def prune_and_reload(model, x, ratio, tmp_path):
    with torch.no_grad():
        ref = model(**x)
    pruned, report = run_method(model, ChannelPruning(ratio=ratio), MethodInputs(data=[x]))
    with torch.no_grad():
        out = pruned(**x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    again, _ = load_artifact(save_artifact(pruned, tmp_path / "m.safetensors"), base_model=model)
    with torch.no_grad():
        torch.testing.assert_close(again(**x), out)
    return pruned, report


@pytest.mark.nlp
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_transformer_hidden_width_and_ffn_are_pruned_through_export(family, tmp_path):
    t = pytest.importorskip("transformers") and import_transformers()
    torch.manual_seed(0)
    if family == "llama":
        hf = t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **LM))
    else:
        hf = t.BertForSequenceClassification(t.BertConfig(**LM, max_position_embeddings=16))
    model = HFLogits(hf).eval()
    x = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    pruned, report = prune_and_reload(model, x, 0.5, tmp_path)
    assert report.info["capture"] == "export"
    base = pruned.hf.model if family == "llama" else pruned.hf.bert
    layer = base.layers[0] if family == "llama" else base.encoder.layer[0]
    if family == "llama":
        assert base.embed_tokens.embedding_dim == 32 and base.norm.weight.shape == (32,)
        assert layer.self_attn.q_proj.in_features == 32 and layer.self_attn.o_proj.out_features == 32
        # the heads go too (prune.heads inside prune.channels): 8 query heads -> 4, 2 kv groups -> 1
        assert layer.self_attn.q_proj.out_features == 32 and layer.self_attn.k_proj.out_features == 8
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features
        assert layer.mlp.down_proj.in_features == 48 and pruned.hf.lm_head.in_features == 32
    else:
        assert base.embeddings.word_embeddings.embedding_dim == 32
        assert base.embeddings.position_embeddings.embedding_dim == 32
        assert base.embeddings.LayerNorm.normalized_shape == (32,)
        assert layer.intermediate.dense.out_features == 48 and layer.output.dense.out_features == 32
    assert n_params(pruned) / n_params(model) < 0.65
    # q/k/v outputs are whole heads: the channel graph keeps them, and the heads went instead
    qkv = ("q_proj", "k_proj", "v_proj", "query", "key", "value")
    assert report.info["heads"] and not [s for s in report.info["skipped"] if s["layer"].endswith(qkv)]


@pytest.mark.nlp
def test_tied_output_embedding_stays_tied(tmp_path):
    t = pytest.importorskip("transformers") and import_transformers()
    torch.manual_seed(0)
    model = HFLogits(t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100))).eval()
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight
    pruned, _ = prune_and_reload(model, {"input_ids": IDS}, 0.25, tmp_path)
    assert pruned.hf.lm_head.weight is pruned.hf.transformer.wte.weight
    assert pruned.hf.transformer.wte.embedding_dim == 24 and pruned.hf.lm_head.in_features == 24
    assert isinstance(pruned.hf.transformer.h[0].mlp.c_fc, nn.Linear)  # Conv1D became the Linear it computes


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))


def test_fx_opaque_transformer_layers_are_looked_into_with_export():
    """fx keeps nn.TransformerEncoder whole; the exported graph prunes its FFN neurons. prune.channels
    swaps MultiheadAttention (one packed in_proj_weight) for modelpress's Attention, so the hidden
    width and the heads are cut as well."""
    torch.manual_seed(0)
    model = Encoder().eval()
    graph = build_channel_graph(model, IDS)
    assert graph.capture == "export"
    ffn = [g for g in graph.groups if g.producers == ["encoder.layers.0.linear1"]]
    assert len(ffn) == 1 and ffn[0].prunable_count() == 64
    pruned, report = run_method(model, ChannelPruning(ratio=0.5), MethodInputs(data=[IDS]))
    assert report.info["capture"] == "export" and report.info["heads"]["encoder.layers.1"] == [4, 2]
    layer = pruned.encoder.layers[1]
    assert layer.linear1.out_features == 32 == layer.linear2.in_features
    assert pruned.embed.embedding_dim == 16 == layer.norm1.normalized_shape[0] == layer.self_attn.q_proj.in_features
    assert layer.self_attn.q_proj.out_features == 16 == layer.self_attn.out_proj.in_features
    assert n_params(pruned) / n_params(model) < 0.35
    assert pruned(IDS).shape == (2, 3)
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)  # the input is untouched


class HardCoded(nn.Module):
    """fx cannot trace it (a Python branch on a size); it hard-codes its width in a view."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        if x.shape[-1] > 1:  # fx: "symbolically traced variables cannot be used as inputs to control flow"
            x = self.a(x)
        return self.b(x.view(x.shape[0], 16))


def test_a_width_hard_coded_in_untraceable_code_fails_loudly():
    model = HardCoded().eval()
    with pytest.raises(UnsupportedError, match="no longer runs.*hard-codes a width.*export"):
        run_method(model, ChannelPruning(ratio=0.5, input_shape=[2, 8]))
    assert model.a.out_features == 16  # the input model is untouched


class WidthBoundAttention(nn.Module):
    """MaxViT-style: the heads are reshaped back to a width read off the input (``b, n, d = x.shape``)."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o((q @ k.transpose(-2, -1)).softmax(-1).matmul(v).transpose(1, 2).reshape(b, n, d))


class WidthBound(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn = nn.Linear(8, 16), WidthBoundAttention()
        self.up, self.down, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(1))


def test_a_width_read_off_another_tensor_keeps_those_channels():
    """The residual width sizes the attention's output view: it stays (with the reason), the FFN
    goes, and the heads, which cannot go either, are left with the reason instead of breaking the model."""
    torch.manual_seed(0)
    model, x = WidthBound().eval(), torch.randn(2, 5, 8)
    pruned, report = run_method(model, ChannelPruning(ratio=0.5), MethodInputs(data=[x]))
    assert report.info["capture"] == "fx"
    assert pruned.embed.out_features == 16 and pruned.up.out_features == 16
    assert any("sizes a view of another tensor" in s["reason"] for s in report.info["skipped"])
    assert "no longer runs" in report.info["heads"]["skipped"] and pruned.attn.q.out_features == 16
    assert pruned(x).shape == (2, 3)
