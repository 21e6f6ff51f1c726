"""prune.heads: exact head/FFN counts, exactness on zeroed heads, save/load, MiniLM."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from modelpress import Scope, prune  # noqa: E402
from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.artifact.hf import SentenceEncoder  # noqa: E402
from modelpress.artifact.loading import load_artifact  # noqa: E402
from modelpress.core.errors import DataError, ScopeError, UnsupportedError  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
from modelpress.pruning.heads import HeadPruning, find_blocks  # noqa: E402

pytestmark = pytest.mark.nlp


def tiny_bert(attn="sdpa", layers=2, heads=4, hidden=32, ffn=64):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=32,
                                  attn_implementation=attn)
    return SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padding exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}


def parts(model, block):
    """The attention module, q/k/v/output projections and FFN layers of a found block."""
    q, k, v = (model.get_submodule(n) for n, _, _ in block.qkv)
    return (block.attention, q, k, v, model.get_submodule(block.out_name), model.get_submodule(block.ffn_in[0]),
            model.get_submodule(block.ffn_out))


def head_rows(block, heads):
    return [h * block.head_dim + i for h in heads for i in range(block.head_dim)]


def run(model, cfg, data=None, inplace=False, **kw):
    pruned, report = run_method(model, cfg, MethodInputs(data=data, **kw), inplace=inplace)
    return pruned.eval(), report.info


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_head_and_ffn_counts_are_exact(attn):
    model = tiny_bert(attn)
    pruned, info = run(model, HeadPruning(head_ratio=0.5, ffn_ratio=0.25))
    for block in find_blocks(pruned):
        attn, q, k, v, out, ffn_in, ffn_out = parts(pruned, block)
        assert block.heads == attn.num_attention_heads == 2 and attn.all_head_size == 16 and block.head_dim == 8
        assert q.out_features == k.out_features == out.in_features == 16
        assert ffn_in.out_features == ffn_out.in_features == 48
        assert out.out_features == 32  # the residual stream keeps its width
    emb = pruned.backbone.embeddings.word_embeddings.weight
    assert emb.shape == model.backbone.embeddings.word_embeddings.weight.shape
    assert pruned(**batch()).shape == (3, 32)
    assert info["heads"]["backbone.encoder.layer.1"] == [4, 2]
    assert info["params"][1] == info["params"][0] - 2 * (3 * (16 * 32 + 16) + 16 * 32 + 16 * (32 + 1) + 16 * 32)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pruning_heads_that_were_zero_changes_nothing(attn):
    model = tiny_bert(attn)
    dead_heads = {0: [1, 3], 1: [0, 2]}
    dead_ffn = {0: list(range(0, 64, 4)), 1: list(range(3, 64, 4))}
    with torch.no_grad():
        for i, block in enumerate(find_blocks(model)):
            _, q, k, v, out, ffn_in, ffn_out = parts(model, block)
            rows = head_rows(block, dead_heads[i])
            for lin in (q, k, v):
                lin.weight[rows] = 0
            out.weight[:, rows] = 0
            ffn_in.weight[dead_ffn[i]] = 0
            ffn_out.weight[:, dead_ffn[i]] = 0
    with torch.no_grad():
        before = model(**batch())
    pruned, _ = run(model, HeadPruning(head_ratio=0.5, ffn_ratio=0.25))
    with torch.no_grad():
        after = pruned(**batch())
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
    # and it removed exactly the dead heads: the survivors are the original live heads
    block0, orig0 = find_blocks(pruned)[0], find_blocks(model)[0]
    assert torch.equal(parts(pruned, block0)[1].weight, parts(model, orig0)[1].weight[head_rows(orig0, [0, 2])])


def test_save_load_round_trip_restores_head_counts(tmp_path):
    model = tiny_bert()
    pruned, _ = run(model, HeadPruning(head_ratio=0.25, ffn_ratio=0.4))
    path = save_artifact(pruned, tmp_path / "bert.safetensors")
    again, header = load_artifact(path, base_model=tiny_bert())
    assert header["structure"]["backbone.encoder.layer.0.attention.self"]["attrs"]["num_attention_heads"] == 3
    assert find_blocks(again)[1].attention.num_attention_heads == 3
    assert torch.equal(again(**batch()), pruned(**batch()))


def test_taylor_with_a_loss_and_scope():
    model = tiny_bert()
    data = [batch()]
    loss = lambda m, inputs, target: m(**inputs).pow(3).sum()  # noqa: E731
    pruned, info = run(model, HeadPruning(head_ratio=0.5, importance="taylor",
                                          scope=Scope(include=["backbone.encoder.layer.0"])), data, loss_fn=loss)
    assert info["heads"] == {"backbone.encoder.layer.0": [4, 2]}
    assert find_blocks(pruned)[1].heads == 4
    with pytest.raises(DataError, match="loss"):
        prune(model, HeadPruning(importance="taylor"), data)  # unlabelled and no loss_fn
    with pytest.raises(DataError):
        prune(model, HeadPruning(importance="taylor"))


def test_errors():
    with pytest.raises(UnsupportedError, match="no transformer attention"):
        prune(torch.nn.Linear(4, 4), HeadPruning())
    with pytest.raises(ScopeError):
        prune(tiny_bert(), HeadPruning(scope=Scope(include=["layer9"])))
    with pytest.raises(Exception, match="head_ratio"):
        HeadPruning(head_ratio=1.0)


def test_minilm_from_the_zoo():
    from modelpress.zoo.models import build_model

    model = build_model("minilm")
    pruned, info = run(model, HeadPruning(head_ratio=0.25, ffn_ratio=0.4), inplace=True)
    assert set(map(tuple, info["heads"].values())) == {(12, 9)}
    assert set(map(tuple, info["ffn"].values())) == {(1536, 922)}
    block = find_blocks(pruned)[0]
    assert parts(pruned, block)[1].out_features == 9 * 32 and block.attention.attention_head_size == 32
    emb = pruned.encode(["A cat sleeps on the mat.", "Stocks fell sharply today."])
    assert emb.shape == (2, 384) and torch.isfinite(emb).all()
