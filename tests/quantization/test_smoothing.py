"""Scales folded into the op producing a layer's input: found on the model and proven by its output."""
from __future__ import annotations

import torch
from tinymodels import layer_kind_cases
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.hf import import_transformers
from modelpress.artifact.loading import load_artifact
from modelpress.core.scope import Scope
from modelpress.engine import MethodInputs, run_method
from modelpress.nn.layer_kinds import plain_linears
from modelpress.quantization.primitives import sqnr
from modelpress.quantization.smoothing import find_folds
from modelpress.quantization.smoothquant import SmoothQuant


def folds_of(model, vocab=100):
    layers = dict(plain_linears(model, Scope().resolve(model, ("Linear",))))
    layers = {n: m for n, m in layers.items() if "lm_head" not in n}
    batch = {"input_ids": torch.randint(0, vocab, (2, 12))}
    return {tuple(f.consumers): f.producer for f in find_folds(model, layers, batch)}


def test_llama_folds_norms_up_proj_and_v_proj_only_without_gqa():
    transformers = import_transformers()
    torch.manual_seed(0)
    for kv_heads, o_producer in ((2, None), (4, "model.layers.0.self_attn.v_proj")):
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=kv_heads)
        folds = folds_of(transformers.LlamaForCausalLM(cfg).eval())
        p = "model.layers.0."
        assert folds == {
            (p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"): p + "input_layernorm",
            (p + "self_attn.o_proj",): o_producer,  # grouped-query attention repeats v: no per-channel fold
            (p + "mlp.gate_proj", p + "mlp.up_proj"): p + "post_attention_layernorm",
            (p + "mlp.down_proj",): p + "mlp.up_proj",  # act(gate) * up is linear in up
        }


def test_bert_post_norm_cannot_fold_and_the_model_is_left_unchanged():
    transformers = import_transformers()
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                                           num_hidden_layers=1, num_attention_heads=4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folds = folds_of(model)
    p = "encoder.layer.0."
    # the norms feed the residual too, GELU is not linear: only value -> attention output folds
    assert folds[(p + "attention.self.query", p + "attention.self.key", p + "attention.self.value")] is None
    assert folds[(p + "attention.output.dense",)] == p + "attention.self.value"
    assert folds[(p + "intermediate.dense",)] is None and folds[(p + "output.dense",)] is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # proofs are undone


def test_relu_is_positively_homogeneous_so_a_linear_before_it_folds():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    layers = {"2": net[2], "4": net[4]}
    folds = {tuple(f.consumers): f.producer for f in find_folds(net, layers, torch.randn(5, 8))}
    assert folds == {("2",): "0", ("4",): None}


def test_a_tied_lm_head_is_scaled_on_its_own_copy_and_the_artifact_keeps_them_apart(tmp_path):
    build, batches, _ = layer_kind_cases()["gpt2"]
    torch.manual_seed(0)
    model = build().eval()
    hf = model.hf
    assert hf.lm_head.weight is hf.transformer.wte.weight
    embedding = hf.transformer.wte.weight.detach().clone()
    x = batches[0][0]
    with torch.no_grad():
        ref = model(x)
    out_model, report = run_method(model, SmoothQuant(alpha=0.5), MethodInputs(data=batches))
    assert report.info["smoothing"]["hf.lm_head"] == "folded into hf.transformer.ln_f"  # provable once untied
    assert torch.equal(out_model.hf.transformer.wte.weight, embedding)  # scaled lm_head, same embedding
    with torch.no_grad():
        out = out_model(x)
    assert sqnr(ref, out) > 30  # the tied head scaled the embedding too: 3.9 dB
    again, _ = load_artifact(save_artifact(out_model, tmp_path / "a.safetensors"), base_model=model)
    with torch.no_grad():
        assert torch.equal(again(x), out)
