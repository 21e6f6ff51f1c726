"""The recipe pipeline through the Python API: run folder, reports, resume, embedding task."""
from __future__ import annotations

import json

import pytest
import torch
from tinymodels import toy_bundle

from modelpress import compress
from modelpress.artifact.loading import load_artifact
from modelpress.recipes.schema import Recipe

NO_LATENCY = {"latency": False, "onnx": False}


def two_stage_recipe():
    return Recipe.from_dict({"version": 1, "name": "two", "eval": NO_LATENCY, "stages": [
        {"name": "p50", "method": "prune.magnitude", "config": {"sparsity": 0.5, "keep_first_last": False},
         "finetune": {"epochs": 1, "lr": 0.01}},
        {"name": "p80", "method": "prune.magnitude", "config": {"sparsity": 0.8, "keep_first_last": False},
         "finetune": {"epochs": 1, "lr": 0.01}}]})


@pytest.fixture
def trained(tiny_mlp):
    from modelpress.core.training import TrainConfig, fit
    fit(tiny_mlp, toy_bundle().train, TrainConfig(epochs=5, lr=0.01))
    return tiny_mlp


def zeros(model):
    return sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))


def test_run_folder_reports_and_input_untouched(tmp_path, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    res = compress(trained, two_stage_recipe(), toy_bundle(), out=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert [r["label"] for r in res.rows] == ["baseline", "p50", "p80"]
    assert res.rows[2]["nonzero"] < res.rows[1]["nonzero"] < res.rows[0]["nonzero"]
    assert res.final["accuracy"] > 0.7
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows"] == json.loads(json.dumps(res.rows))
    assert (tmp_path / "stages/02-p80/model.safetensors").exists()
    # masks from stage 1 were kept through stage 2's fine-tune: stage-1 zeros stay zero
    s1, _ = load_artifact(tmp_path / "stages/01-p50/model.safetensors", base_model=trained)
    final, _ = load_artifact(tmp_path / "model.safetensors", base_model=trained)
    for (n, p1), (_, p2) in zip(s1.named_parameters(), final.named_parameters()):
        if n.endswith("weight"):
            assert torch.all(p2[p1 == 0] == 0), n


def test_resume_after_a_lost_stage_gives_identical_weights(tmp_path, trained):
    full = compress(trained, two_stage_recipe(), toy_bundle(), out=tmp_path / "a").model
    run = tmp_path / "b"
    compress(trained, two_stage_recipe(), toy_bundle(), out=run)
    # simulate a crash during stage 2: its completion marker and the final outputs are missing
    (run / "stages/02-p80/metrics.json").unlink()
    (run / "model.safetensors").unlink()
    resumed = compress(trained, two_stage_recipe(), toy_bundle(), out=run).model
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_embedding_task_fine_tunes_against_the_original(tmp_path):
    transformers = pytest.importorskip("transformers")
    from modelpress.artifact.hf import SentenceEncoder
    from modelpress.zoo.corpora import minilm_path
    from modelpress.zoo.datasets import load_dataset

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    model = SentenceEncoder(transformers.BertModel(cfg), tok)
    bundle = load_dataset("sts")
    recipe = Recipe.from_dict({"version": 1, "eval": NO_LATENCY, "stages": [
        {"method": "prune.magnitude", "config": {"sparsity": 0.5, "scope": {"include": ["re:.*encoder.*dense"]}},
         "finetune": {"epochs": 0.05, "lr": 1e-3, "batch_size": 32}}]})
    res = compress(model, recipe, bundle, out=tmp_path)
    base, final = res.rows
    assert base["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < final["fidelity"] < 1.0
    assert -1 <= final["spearman"] <= 1


def test_a_stage_can_recover_by_distilling_from_the_baseline(trained, monkeypatch):
    """`distill:` on a stage: its training learns from the uncompressed baseline's outputs."""
    import modelpress.engine.inputs as engine_inputs  # every stage trains through MethodInputs.fit
    from modelpress.core.training import fit as real_fit

    seen = []

    def spy(model, data, cfg=None, *, loss_fn=None, **kw):
        seen.append(loss_fn)
        return real_fit(model, data, cfg, loss_fn=loss_fn, **kw)

    recipe = Recipe.from_dict({"version": 1, "name": "kd", "eval": NO_LATENCY, "stages": [
        {"name": "p70", "method": "prune.magnitude", "config": {"sparsity": 0.7, "keep_first_last": False},
         "finetune": {"epochs": 2, "lr": 0.01}, "distill": {"T": 2.0, "alpha": 0.7}}]})
    assert recipe.stages[0].distill.T == 2.0 and recipe.stages[0].distill.teacher is None
    monkeypatch.setattr(engine_inputs, "fit", spy)
    res = compress(trained, recipe, toy_bundle())
    monkeypatch.undo()
    assert seen and all(fn is not None and fn.__qualname__.startswith("distillation_loss") for fn in seen)
    assert res.final["accuracy"] > 0.7
    with pytest.raises(Exception, match="distill"):
        Recipe.from_dict({"version": 1, "stages": [{"method": "prune.magnitude", "distill": {"T": -1}}]})
