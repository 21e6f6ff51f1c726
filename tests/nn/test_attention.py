"""modelpress's Attention computes exactly what nn.MultiheadAttention computes (every mask, layout
and nn.TransformerEncoder's nested-tensor inference path), so prune.heads and prune.channels can
swap it in; it reloads from artifacts after its heads were cut."""
import pytest
import torch
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import UnsupportedError
from modelpress.engine import MethodInputs, run_method
from modelpress.nn.attention import Attention, convert_multihead_attention, from_multihead_attention
from modelpress.pruning.heads import HeadPruning

B, T, S, E = 2, 5, 7, 16


def pair(**kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 4, **kw).eval()
    return mha, from_multihead_attention(mha)


def both(mha, attn, *args, **kw):
    with torch.no_grad():
        return mha(*args, **kw), attn(*args, **kw)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["self", "cross", "kpm", "float_mask", "bool_mask", "causal", "per_head",
                                  "unbatched", "no_weights", "no_average"])
def test_same_outputs_and_weights_as_multihead_attention(batch_first, case):
    mha, attn = pair(batch_first=batch_first)
    shape = (lambda n: (B, n, E)) if batch_first else (lambda n: (n, B, E))
    q = torch.randn(*shape(T))
    kv = torch.randn(*shape(S)) if case == "cross" else q
    tk = kv.shape[1 if batch_first else 0]
    kw = {}
    if case == "kpm":
        kw["key_padding_mask"] = torch.tensor([[False] * (tk - 2) + [True] * 2, [False] * tk])
    elif case == "float_mask":
        kw["attn_mask"] = torch.randn(T, tk)
    elif case == "bool_mask":
        kw["attn_mask"] = torch.triu(torch.ones(T, tk, dtype=torch.bool), 1)
    elif case == "causal":
        kw = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(T), "is_causal": True}
    elif case == "per_head":
        kw["attn_mask"] = torch.randn(B * 4, T, tk)
    elif case == "unbatched":
        q = kv = torch.randn(T, E)
    elif case == "no_weights":
        kw["need_weights"] = False
    elif case == "no_average":
        kw["average_attn_weights"] = False
    (ref, ref_w), (out, w) = both(mha, attn, q, kv, kv, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if ref_w is None:
        assert w is None
    else:
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_kdim_vdim_and_no_bias():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 2, kdim=6, vdim=10, bias=False, batch_first=True).eval()
    attn = from_multihead_attention(mha)
    q, k, v = torch.randn(B, T, E), torch.randn(B, S, 6), torch.randn(B, S, 10)
    (ref, _), (out, _) = both(mha, attn, q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert attn.k_proj.in_features == 6 and attn.q_proj.bias is None


def test_transformer_encoder_fast_path_with_padding_is_unchanged():
    """In eval, nn.TransformerEncoder turns a padded batch into nested tensors before its layers."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 4, 32, batch_first=True), 2).eval()
    x = torch.randn(B, T, E)
    pad = torch.tensor([[False] * 3 + [True] * 2, [False] * T])
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
        assert convert_multihead_attention(enc) == ["layers.0.self_attn", "layers.1.self_attn"]
        out = enc(x, src_key_padding_mask=pad)
    assert isinstance(enc.layers[0].self_attn, Attention)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bias_kv_is_refused_and_left_alone():
    mha = nn.MultiheadAttention(E, 4, add_bias_kv=True)
    with pytest.raises(UnsupportedError, match="add_bias_kv"):
        from_multihead_attention(mha)
    model = nn.Sequential(mha)
    assert convert_multihead_attention(model) == [] and model[0] is mha


def test_decoder_heads_are_cut_and_the_artifact_reloads(tmp_path):
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(E, 4, 32, batch_first=True).eval()
    x, memory = torch.randn(B, T, E), torch.randn(B, S, E)
    pruned, report = run_method(model, HeadPruning(head_ratio=0.5, ffn_ratio=0.0),
                                MethodInputs(data=[((x, memory),)]))
    assert pruned.self_attn.num_heads == 2 and pruned.self_attn.head_dim == 4
    with torch.no_grad():
        out = pruned(x, memory)
    again, _ = load_artifact(save_artifact(pruned, tmp_path / "d.safetensors"), base_model=model)
    with torch.no_grad():
        torch.testing.assert_close(again(x, memory), out)
