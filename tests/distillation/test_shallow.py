"""distill.shallow: blocks kept by measured fidelity, the original distilled into them, artifacts reload."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ConfigError, UnsupportedError
from modelpress.core.training import TrainConfig
from modelpress.distillation.shallow import ShallowDistillation
from modelpress.engine import MethodInputs, run_method
from modelpress.tasks.embedding import SentenceEmbedding


class Residual(nn.Module):
    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            self.fc.bias.mul_(scale)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def residual_net(scales=(1.0, 0.0, 3.0, 0.0, 2.0, 0.0)) -> nn.Module:
    """Blocks with scale 0 are identities: dropping them costs nothing, the others change the output."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Sequential(*[Residual(16, s) for s in scales]), nn.Linear(16, 4))


def data(n: int = 256):
    torch.manual_seed(1)
    x = torch.randn(n, 8)
    return [x[i:i + 64] for i in range(0, n, 64)]


def cosine(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cosine_similarity(a(x), b(x)).mean())


def test_fidelity_selection_keeps_the_blocks_that_matter():
    model = residual_net()
    small, report = run_method(model, ShallowDistillation(keep=3), MethodInputs(data=data()))
    assert report.info["kept"] == [0, 2, 4] and report.info["stack"] == "1"
    assert report.info["fidelity_untrained"] == pytest.approx(1.0, abs=1e-6)  # only identities went
    assert len(small[1]) == 3 and len(model[1]) == 6  # the input model is left as it was
    x = torch.randn(32, 8)
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_keep_fraction_uniform_and_explicit_layers():
    model = residual_net()
    _, r = run_method(model, ShallowDistillation(keep=0.5, selection="uniform"), MethodInputs(data=data()))
    assert r.info["kept"] == [1, 3, 5]  # every other block, ending at the last
    _, r = run_method(model, ShallowDistillation(layers=[1, 5]), MethodInputs(data=data()))
    assert r.info["kept"] == [1, 5] and r.info["selection"] == "layers"
    for bad in (ShallowDistillation(keep=6), ShallowDistillation(keep=0.99), ShallowDistillation(layers=[0, 9])):
        with pytest.raises(ConfigError):
            run_method(model, bad, MethodInputs(data=data()))
    with pytest.raises(ConfigError, match="no module"):
        run_method(model, ShallowDistillation(stack="blocks"), MethodInputs(data=data()))


def test_distilling_recovers_what_dropping_lost(tmp_path):
    model = residual_net((1.0, 2.0, 1.5, 2.5))
    x = torch.randn(64, 8)
    dropped, _ = run_method(model, ShallowDistillation(keep=2), MethodInputs(data=data()))
    train = TrainConfig(epochs=30, lr=3e-3, batch_size=64)
    small, report = run_method(model, ShallowDistillation(keep=2, loss="embedding_mse"),
                               MethodInputs(data=data(), train=train), seed=0)
    assert report.trained and not report.fine_tuned
    before, after = cosine(dropped, model, x), cosine(small, model, x)
    assert after > before + 0.02 and after > 0.95
    path = save_artifact(small, tmp_path / "s.safetensors")
    again, _ = load_artifact(path, base_model=residual_net((1.0, 2.0, 1.5, 2.5)))
    assert len(again[1]) == 2 and torch.equal(again(x), small(x))


def test_shape_changing_blocks_stay():
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(8, 16), *[nn.Linear(16, 16) for _ in range(3)])  # the first widens
    model = nn.Sequential(stage, nn.Linear(16, 2))
    _, r = run_method(model, ShallowDistillation(keep=2, stack="0"), MethodInputs(data=data()))
    assert 0 in r.info["kept"] and len(r.info["kept"]) == 2
    with pytest.raises(ConfigError, match="shape"):
        run_method(model, ShallowDistillation(layers=[1, 2], stack="0"), MethodInputs(data=data()))
    with pytest.raises(UnsupportedError, match="must stay"):
        run_method(nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)), nn.Linear(4, 2)),
                   ShallowDistillation(keep=1, stack="0"), MethodInputs(data=data()))


def hf_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from modelpress.artifact.hf import SentenceEncoder
    from modelpress.zoo.corpora import load_tokenizer

    tok = load_tokenizer()
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    return SentenceEncoder(transformers.BertModel(config), tok)


def test_sentence_encoder_keeps_half_its_layers_and_reloads(tmp_path):
    from modelpress.tasks.embedding import TokenizedSentences
    from modelpress.zoo.corpora import load_sentences

    enc = hf_encoder(tmp_path).eval()
    sentences = TokenizedSentences.from_sentences(load_sentences(128), enc.tokenizer)
    small, report = run_method(enc, ShallowDistillation(keep=0.5),
                               MethodInputs(data=sentences, task=SentenceEmbedding(),
                                            train=TrainConfig(epochs=1, max_steps=2, batch_size=32)))
    assert report.info["stack"] == "backbone.encoder.layer" and len(report.info["kept"]) == 2
    assert report.info["loss"] == "embedding_cosine"
    assert small.backbone.config.num_hidden_layers == 2 and len(small.backbone.encoder.layer) == 2
    assert enc.backbone.config.num_hidden_layers == 4  # the input model is untouched
    assert not any(p.requires_grad is False for p in small.parameters())  # frozen embeddings thawed after
    path = save_artifact(small, tmp_path / "enc.safetensors")
    again, _ = load_artifact(path, base_model=hf_encoder(tmp_path))
    batch = sentences.collate([sentences[i] for i in range(4)])
    with torch.no_grad():
        assert torch.allclose(again(**batch), small(**batch), atol=1e-6)


def test_a_reloaded_shallow_encoder_saves_and_reloads_again(tmp_path):
    """A recipe resuming after stage 1 loads stage 2's file into the reloaded stage-1 model: a reload's
    replay record must describe the original architecture, as the file does."""
    from modelpress.tasks.embedding import TokenizedSentences
    from modelpress.zoo.corpora import load_sentences

    enc = hf_encoder(tmp_path).eval()
    sentences = TokenizedSentences.from_sentences(load_sentences(64), enc.tokenizer)
    small, _ = run_method(enc, ShallowDistillation(keep=2), MethodInputs(data=sentences, task=SentenceEmbedding()))
    first = save_artifact(small, tmp_path / "1.safetensors")
    again, _ = load_artifact(first, base_model=hf_encoder(tmp_path))
    second = save_artifact(again, tmp_path / "2.safetensors")
    batch = sentences.collate([sentences[i] for i in range(4)])
    for path, base in ((first, again), (second, again), (second, hf_encoder(tmp_path))):
        model, _ = load_artifact(path, base_model=base)
        with torch.no_grad():
            assert len(model.backbone.encoder.layer) == 2 and torch.equal(model(**batch), small(**batch))


def test_decoder_with_grouped_query_attention_renumbers_its_cache_slots():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (8, 12))
    small, report = run_method(lm, ShallowDistillation(keep=2), MethodInputs(data=[{"input_ids": ids}]))
    assert report.info["stack"] == "model.layers" and small.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    assert [layer.self_attn.layer_idx for layer in lm.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():  # a cached generation step matches the full forward
        full = small(ids[:1]).logits[:, -1]
        past = small(ids[:1, :-1], use_cache=True).past_key_values
        step = small(ids[:1, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-4)


def test_models_without_a_stack_are_refused_in_one_line():
    with pytest.raises(UnsupportedError, match="no stack"):
        run_method(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), ShallowDistillation(),
                   MethodInputs(data=data()))
