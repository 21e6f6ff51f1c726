"""Tasks as objects, and the user's own data for every task."""
from __future__ import annotations

import pytest
import torch
from tinymodels import TinyMLP

from modelpress.core.errors import ConfigError, DataError
from modelpress.core.registry import Registry
from modelpress.tasks import Classification, SentenceEmbedding, load_dataset
from modelpress.tasks.datasets import DATASETS


def test_registry_policy_one_name_one_entry():
    r = Registry("thing")
    r.register("a", 1)
    r.register("a", 1)  # the same entry again: a no-op
    with pytest.raises(ConfigError, match="registered twice"):
        r.register("a", 2)
    with pytest.raises(ConfigError, match="unknown thing 'b'"):
        r.get("b")


def test_every_builtin_registry_shares_the_policy():
    from modelpress.artifact.encodings import ENCODINGS
    from modelpress.artifact.loading import SOURCES
    from modelpress.engine.registry import METHODS
    from modelpress.export.deploy import EXPORTERS
    from modelpress.nn.records import ATTRS, BUILDABLES, REPLAYS
    from modelpress.pruning.importance import IMPORTANCE
    from modelpress.quantization.observers import OBSERVERS
    from modelpress.zoo.models import MODELS

    for reg in (ENCODINGS, SOURCES, METHODS, EXPORTERS, ATTRS, BUILDABLES, REPLAYS, IMPORTANCE, OBSERVERS, MODELS,
                DATASETS):
        assert isinstance(reg, Registry) and len(reg) > 0, reg.kind


def test_classification_task_gives_loss_metric_and_inputs():
    bundle = load_dataset("digits")
    assert isinstance(bundle.task, Classification) and bundle.task.labelled and bundle.task.primary == "accuracy"
    assert bundle.example_inputs(2).shape == (2, 1, 28, 28)
    assert bundle.task.training_loss(reference=None) is None  # labels: cross-entropy
    out, ref = torch.randn(4, 10), torch.randn(4, 10)
    assert float(bundle.task.output_divergence(out, out)) == pytest.approx(0.0, abs=1e-6)
    assert float(bundle.task.output_divergence(out, ref)) > 0


def test_csv_dataset_reads_features_and_a_named_label_column(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    rows = ["a,b,c,kind"] + [f"{a:.4f},{b:.4f},{c:.4f},{'yes' if a + b > 0 else 'no'}" for a, b, c in x.tolist()]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    bundle = load_dataset(f"csv:{tmp_path / 't.csv'}?label=kind")
    assert (len(bundle.train), len(bundle.test), bundle.num_classes, bundle.input_shape) == (80, 20, 2, (3,))
    assert bundle.meta["classes"] == ["no", "yes"]
    metrics = bundle.evaluate(TinyMLP(d_in=3, classes=2))
    assert set(metrics) == {"accuracy"}
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,x\n1,oops,y\n3,4,x\n")
    with pytest.raises(DataError, match="line 3: a feature is not a number"):
        load_dataset(f"csv:{tmp_path / 'bad.csv'}")
    with pytest.raises(DataError, match="has no column 'nope'"):
        load_dataset(f"csv:{tmp_path / 't.csv'}?label=nope")


@pytest.mark.nlp
def test_sentence_embedding_scores_the_users_own_graded_pairs(tmp_path):
    pytest.importorskip("transformers")
    from modelpress.zoo.models import build_model

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("5.0\tA cat sleeps on the sofa.\tA kitten is sleeping on the couch.\n"
                     "0.2\tA cat sleeps on the sofa.\tThe stock market fell sharply today.\n"
                     "4.0\tHe is cooking pasta.\tA man prepares spaghetti.\n"
                     "0.5\tHe is cooking pasta.\tThe train left the station.\n")
    bundle = load_dataset(f"sts:{pairs}")
    assert isinstance(bundle.task, SentenceEmbedding) and len(bundle.test) == 4
    model = build_model("minilm")
    q = bundle.evaluate(model, reference=model)
    assert q["spearman"] == pytest.approx(1.0) and q["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert bundle.example_inputs(1)["input_ids"].shape[0] == 1
    (tmp_path / "one.tsv").write_text("5.0\ta\tb\n")
    with pytest.raises(DataError, match="Spearman needs at least 2"):
        load_dataset(f"sts:{tmp_path / 'one.tsv'}")


@pytest.mark.nlp
def test_unlabelled_sentences_are_scored_by_fidelity(tmp_path):
    pytest.importorskip("transformers")
    from modelpress.zoo.models import build_model

    (tmp_path / "s.txt").write_text("\n".join(f"Sentence number {i} is about topic {i % 7}." for i in range(40)))
    bundle = load_dataset(f"sentences:{tmp_path / 's.txt'}")
    assert bundle.task.metrics == ("fidelity",) and len(bundle.train) == 36 and len(bundle.test) == 4
    model = build_model("minilm")
    assert bundle.evaluate(model) == {"fidelity": 1.0}
    assert bundle.evaluate(model, reference=model)["fidelity"] == pytest.approx(1.0, abs=1e-5)
