"""The compressed-tensors folder loads back in transformers and computes what modelpress's model computes."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from modelpress.core.errors import ConfigError, ModelpressError
from modelpress.engine import MethodInputs, run_method
from modelpress.pruning.nm import NMSparsity, verify_nm
from modelpress.pruning.wanda import Wanda
from modelpress.quantization.awq import AWQ
from modelpress.quantization.dynamic import DynamicInt8
from modelpress.quantization.gptq import GPTQ
from modelpress.quantization.weight_only import WeightOnly

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from modelpress.artifact.hf import HFLogits  # noqa: E402
from modelpress.export.compressed_tensors import (  # noqa: E402
    CompressedTensorsError,
    export_compressed_tensors,
    load_exported,
)

VOCAB = 512


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama (GQA: 4 heads, 2 kv heads; SwiGLU 256; untied head), its calibration
    batches and an input of another size."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = HFLogits(transformers.LlamaForCausalLM(config)).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randint(0, VOCAB, (4, 32), generator=g) for _ in range(4)], \
        torch.randint(0, VOCAB, (3, 24), generator=g)


@pytest.fixture(scope="module")
def quantized(llama):
    """``quantized(name)``: the tiny Llama compressed one way, made once per module."""
    fp, batches, _ = llama
    configs = {"rtn-sym": WeightOnly(bits=4, granularity="group", group_size=64),
               "rtn-asym": WeightOnly(bits=4, granularity="group", group_size=64, symmetric=False),
               "gptq": GPTQ(bits=4, group_size=64, calibration_batches=2),
               "awq": AWQ(bits=4, group_size=64, calibration_batches=2),  # its scales live in the norms
               "w4g128": WeightOnly(bits=4, granularity="group", group_size=128),
               "w8": WeightOnly(bits=8, keep_first_last=True),   # first q_proj and lm_head stay float
               "nm": NMSparsity(n=2, m=4)}
    made = {}

    def get(name):
        if name not in made:
            if name == "nm-w4":
                made[name] = run_method(get("nm"), configs["rtn-sym"])[0]
            else:
                made[name] = run_method(fp, configs[name], MethodInputs(data=batches[:2]))[0]
        return made[name]
    return get


def logits(model, ids):
    with torch.no_grad():
        return model(ids) if isinstance(model, HFLogits) else model(input_ids=ids).logits


def rel(a, b):
    return float((a - b).norm() / b.norm())


def tensors(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_logits(q, back, fp, ids):
    """The folder computes modelpress's numbers (float rounding apart) and is as far from fp32 as they are."""
    ours, theirs, ref = logits(q, ids), logits(back, ids), logits(fp, ids)
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max(), (ours - theirs).abs().max()
    err = rel(ours, ref)
    assert 1e-3 < err < 0.3 and abs(rel(theirs, ref) - err) < 1e-6 * err + 1e-7
    return (ours - theirs).abs().max().item(), err


@pytest.mark.parametrize("method,symmetric", [("rtn", True), ("rtn", False), ("gptq", True), ("awq", True)])
def test_int4_groups_load_in_transformers_with_modelpress_logits(tmp_path, llama, quantized, method, symmetric):
    fp, _, ids = llama
    q = quantized(method if method != "rtn" else "rtn-sym" if symmetric else "rtn-asym")
    out = export_compressed_tensors(q, tmp_path / "w4", check_inputs=ids)
    assert "transformers vs modelpress max abs diff" in out.note and len(out.quantized) == 15

    qc = json.loads((tmp_path / "w4" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "pack-quantized", [])
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and {k: group["weights"][k] for k in
                                                ("num_bits", "type", "symmetric", "strategy", "group_size")} == \
        {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 64}

    t = tensors(tmp_path / "w4")
    down = "model.layers.1.mlp.down_proj"   # (128, 256): 8 int4 per int32, 4 groups of 64 per row
    assert t[f"{down}.weight_packed"].dtype == torch.int32 and t[f"{down}.weight_packed"].shape == (128, 32)
    assert t[f"{down}.weight_scale"].shape == (128, 4) and t[f"{down}.weight_shape"].tolist() == [128, 256]
    assert f"{down}.weight" not in t and "model.embed_tokens.weight" in t
    if symmetric:
        assert f"{down}.weight_zero_point" not in t
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w4").eval()  # the plain load
    else:  # zero points packed 8 per int32 along the outputs
        assert t[f"{down}.weight_zero_point"].shape == (16, 4)
        back = load_exported(tmp_path / "w4")
    diff, err = assert_same_logits(q, back, fp, ids)
    print(f"{method} w4g64 {'sym' if symmetric else 'asym'}: max |logits diff| vs modelpress {diff:.2e}, "
          f"relative error vs fp32 {err:.4f}")


def test_int4_group_128_is_at_most_4_3_bits_per_weight(tmp_path, llama, quantized):
    fp, _, ids = llama
    q = quantized("w4g128")
    out = export_compressed_tensors(q, tmp_path / "w4g128")
    t = tensors(tmp_path / "w4g128")
    params = sum(m.weight_shape[0] * m.weight_shape[1] for _, m in q.named_modules() if hasattr(m, "qweight"))
    stored = sum(v.numel() * v.element_size() for k, v in t.items() if ".weight_" in k)
    assert out.quantized_params == params and out.quantized_bytes == stored
    # 4 bits + one fp32 scale per 128 weights = 4.25, plus 16 bytes of shape per layer
    assert 4.25 <= out.bits_per_weight <= 4.3, out.bits_per_weight
    print(f"w4g128: {out.bits_per_weight:.3f} bits per quantized weight, model.safetensors {out.file_bytes:,} bytes")
    diff, _ = assert_same_logits(q, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w4g128"), fp, ids)
    print(f"w4g128: max |logits diff| {diff:.2e}")


def test_int8_per_channel_and_float_layers_in_ignore(tmp_path, llama, quantized):
    fp, _, ids = llama
    q = quantized("w8")
    out = export_compressed_tensors(q, tmp_path / "w8")
    qc = json.loads((tmp_path / "w8" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "pack-quantized" and group["weights"]["num_bits"] == 8
    assert group["weights"]["strategy"] == "channel" and group["weights"]["group_size"] is None
    assert sorted(qc["ignore"]) == sorted(out.ignored) == ["lm_head", "model.layers.0.self_attn.q_proj"]
    t = tensors(tmp_path / "w8")
    assert t["lm_head.weight"].dtype == torch.float32 and "lm_head.weight_packed" not in t
    assert t["model.layers.0.mlp.up_proj.weight_packed"].shape == (256, 32)   # 4 int8 per int32
    assert t["model.layers.0.mlp.up_proj.weight_scale"].shape == (256, 1)
    assert 8 < out.bits_per_weight < 8.3
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w8").eval()
    assert torch.equal(back.lm_head.weight, fp.hf.lm_head.weight)
    assert_same_logits(q, back, fp, ids)


def test_a_packed_head_is_untied_from_the_float_embeddings(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    fp = HFLogits(transformers.LlamaForCausalLM(config)).eval()
    q, _ = run_method(fp, WeightOnly(bits=8))
    ids = torch.randint(0, VOCAB, (2, 12))
    out = export_compressed_tensors(q, tmp_path / "tied", check_inputs=ids)   # loads it back and compares
    assert "lm_head" in out.quantized and fp.hf.config.tie_word_embeddings
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("tag", ["nm", "nm-w4", "wanda"])
def test_2_4_sparse_keeps_its_zeros_alone_and_under_int4(tmp_path, llama, quantized, tag):
    fp, batches, ids = llama
    if tag == "wanda":  # a calibrated pruner: the exporter reads the zeros, not the method
        model = run_method(fp, Wanda(pattern="2:4", calibration_batches=1), MethodInputs(data=batches[:1]))[0]
    else:
        model = quantized(tag)
    out = export_compressed_tensors(model, tmp_path / tag)
    assert len(out.sparse) == 13   # 2 layers x 7 Linear, the first q_proj and lm_head left dense
    qc = json.loads((tmp_path / tag / "config.json").read_text())["quantization_config"]
    sc = qc["sparsity_config"]
    assert (sc["format"], sc["sparsity_structure"], sc["targets"]) == ("dense", "2:4", ["Linear"])
    assert sorted(sc["ignore"]) == ["lm_head", "model.layers.0.self_attn.q_proj"]
    assert (qc["format"] == "pack-quantized") == (tag == "nm-w4")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / tag).eval()
    ours = dict(model.hf.named_modules())
    logits(back, ids[:1])  # the first forward decompresses packed layers
    for name in out.sparse:   # at most 2 of every 4 inputs, the same weights as modelpress's
        w = back.get_submodule(name).weight
        assert verify_nm(w, 2, 4) and torch.equal(w, ours[name].weight.detach())
        zeros = float((w == 0).float().mean())   # int4 may round a kept weight to 0 as well
        assert zeros == 0.5 if tag != "nm-w4" else 0.5 <= zeros < 0.55
    ours_l, theirs_l = logits(model, ids), logits(back, ids)
    assert (ours_l - theirs_l).abs().max() <= 1e-5 * ours_l.abs().max()
    if tag == "nm-w4":  # as far from the float 2:4 model as modelpress's int4 model is
        assert_same_logits(model, back, quantized("nm"), ids)


def test_what_the_format_cannot_hold_is_one_error_and_no_folder(tmp_path, llama, quantized):
    from tests.tinymodels import tiny_gpt2

    fp, _, _ = llama
    mlp = run_method(nn.Sequential(nn.Linear(8, 8)), WeightOnly(bits=4))[0]
    with pytest.raises(CompressedTensorsError, match="not a Hugging Face transformers model") as err:
        export_compressed_tensors(mlp, tmp_path / "a")
    assert err.value.hint
    gpt2 = run_method(tiny_gpt2().eval(), WeightOnly(bits=4))[0]   # GPT-2's Conv1D became a packed Linear
    with pytest.raises(CompressedTensorsError, match="is a Conv1D in GPT2LMHeadModel"):
        export_compressed_tensors(gpt2, tmp_path / "b")
    dyn = run_method(fp, DynamicInt8())[0]
    with pytest.raises(CompressedTensorsError, match="is a modelpress (Int8Embedding|DynamicInt8Linear)"):
        export_compressed_tensors(dyn, tmp_path / "d")
    q = copy.deepcopy(quantized("rtn-sym"))
    q.hf.lm_head = nn.Linear(128, 256, bias=False)  # an architecture config.json does not describe
    with pytest.raises(CompressedTensorsError, match="'lm_head.weight' is .256, 128. in the model"):
        export_compressed_tensors(q, tmp_path / "c")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        export_compressed_tensors(fp, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]   # nothing half-written


def test_a_folder_is_replaced_whole_and_a_failed_check_leaves_the_old_one(tmp_path, llama, quantized, monkeypatch):
    from modelpress.export import compressed_tensors as ct

    fp, _, ids = llama
    dest = tmp_path / "out"
    export_compressed_tensors(fp, dest)   # a float model: a plain folder
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())
    q = quantized("rtn-sym")

    def wrong(*args, **kwargs):
        raise ct.ExportMismatchError("no")
    monkeypatch.setattr(ct, "check_exported", wrong)
    with pytest.raises(ModelpressError):
        export_compressed_tensors(q, dest, check_inputs=ids)
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())
    monkeypatch.undo()
    export_compressed_tensors(q, dest, check_inputs=ids)
    assert "quantization_config" in json.loads((dest / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
