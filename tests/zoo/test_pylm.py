"""The decoder-LM testbed (pylm-tiny on pystdlib-tiny): it learns, its split holds files out, GPTQ
beats round-to-nearest on it and a quantized artifact reloads to the same perplexity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.engine import MethodInputs, run_method
from modelpress.quantization.gptq import GPTQ
from modelpress.quantization.weight_only import WeightOnly

pytest.importorskip("transformers")
pytestmark = pytest.mark.nlp

SPEC = "pystdlib-tiny?eval_blocks=48"


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    from modelpress.zoo.datasets import load_dataset
    from modelpress.zoo.models import build_model

    # module fixtures run before conftest's per-test cache: point at the same private cache here
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        bundle = load_dataset(SPEC)
        model = build_model("pylm-tiny")
    return model, bundle, bundle.evaluate(model)["perplexity"]


def quantized(model, bundle, cfg):
    out, _ = run_method(model, cfg, MethodInputs(data=bundle.train, task=bundle.task))
    return out


def test_tiny_lm_is_llama_and_beats_the_unigram_model(testbed):
    from modelpress.artifact.hf import HFLogits
    from modelpress.zoo.pylm import TESTBEDS, tokenized_corpus, unigram_perplexity

    model, bundle, ppl = testbed
    assert isinstance(model, HFLogits) and model.zoo_spec == {"zoo": "pylm-tiny", "kwargs": {}}
    cfg = model.hf.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 128, 4, 2)
    _, train_ids, test_ids = tokenized_corpus(TESTBEDS["pylm-tiny"])
    unigram = unigram_perplexity(train_ids, test_ids, cfg.vocab_size)
    assert ppl < 0.6 * unigram < 0.6 * cfg.vocab_size  # context is used: well below what unigrams reach
    assert model.tokenizer.decode(model.tokenizer("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_split_holds_files_out_and_batches_feed_the_model(testbed):
    from modelpress.zoo.pylm import is_held_out

    _, bundle, _ = testbed
    files = json.loads((Path(bundle.meta["tokenizer"]) / "files.json").read_text())
    assert files["test"] and not set(files["test"]) & set(files["train"])
    assert all(is_held_out(f) for f in files["test"]) and not any(is_held_out(f) for f in files["train"])
    batch = next(iter(bundle.train))
    assert set(batch) == {"input_ids"} and tuple(batch["input_ids"].shape) == (8, 64)
    assert len(bundle.test) == 48 and bundle.example_inputs(1)["input_ids"].shape == (1, 64)


def test_gptq_w4_keeps_perplexity_and_beats_rtn_at_3_bits(testbed):
    model, bundle, ppl = testbed
    gptq4 = bundle.evaluate(quantized(model, bundle, GPTQ(bits=4, group_size=128, calibration_batches=4)))
    rtn3 = bundle.evaluate(quantized(model, bundle, WeightOnly(bits=3, granularity="group", group_size=128)))
    gptq3 = bundle.evaluate(quantized(model, bundle, GPTQ(bits=3, group_size=128, calibration_batches=4)))
    assert gptq4["perplexity"] < ppl * 1.01
    assert rtn3["perplexity"] > ppl  # 3 bits cost something ...
    assert gptq3["perplexity"] - ppl <= 0.5 * (rtn3["perplexity"] - ppl)  # ... and GPTQ loses at most half of it
    assert gptq4["perplexity"] < rtn3["perplexity"]


def test_quantized_lm_artifact_reloads_to_the_same_perplexity(testbed, tmp_path):
    model, bundle, _ = testbed
    q = quantized(model, bundle, GPTQ(bits=4, group_size=128, calibration_batches=2))
    before = bundle.evaluate(q)["perplexity"]
    path = save_artifact(q, tmp_path / "q.safetensors")
    assert path.stat().st_size < 0.45 * sum(p.numel() * 4 for p in model.parameters())
    reloaded, _ = load_artifact(path)  # rebuilt from the zoo name (the cached pylm-tiny), then its tensors
    assert bundle.evaluate(reloaded)["perplexity"] == pytest.approx(before, rel=1e-6)
    with torch.no_grad():
        ids = bundle.example_inputs(2)
        assert torch.equal(q(**ids), reloaded(**ids))


def test_text_file_dataset_with_the_models_tokenizer(testbed, tmp_path):
    from modelpress.core.errors import DataError
    from modelpress.zoo.datasets import load_dataset
    from modelpress.zoo.pylm import TESTBEDS, model_dir

    model, _, _ = testbed
    text = tmp_path / "code.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 60)
    bundle = load_dataset(f"text:{text}?tokenizer={model_dir(TESTBEDS['pylm-tiny'])}&block=32")
    assert bundle.task.primary == "perplexity" and len(bundle.train.dataset) > 5 * len(bundle.test) >= 5  # 90 / 10
    assert bundle.evaluate(model)["perplexity"] < 0.25 * model.hf.config.vocab_size  # its tokenizer, not garbage
    with pytest.raises(DataError, match="too few"):
        load_dataset(f"text:{text}?tokenizer={model_dir(TESTBEDS['pylm-tiny'])}&block=4096")
