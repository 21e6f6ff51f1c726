"""Model references: zoo names, factories, Hugging Face directories, artifacts, torch files."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact, load_model
from modelpress.core.errors import ModelLoadError


def test_zoo_name_and_artifact_round_trip(tmp_path):
    m = load_model("lenet5")
    path = save_artifact(m, tmp_path / "a.safetensors")
    again = load_model(path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), m.eval()(x))
    assert again.zoo_spec["zoo"] == "lenet5"


def test_unknown_reference_lists_options(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file, a directory or a zoo model") as e:
        load_model("lenet55")
    assert "lenet5" in e.value.hint
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(tmp_path)
    (tmp_path / "f.py").write_text("x = 1\n")
    with pytest.raises(ModelLoadError, match="name the factory"):
        load_model(tmp_path / "f.py")
    with pytest.raises(ModelLoadError, match="has no function 'build'"):
        load_model(f"{tmp_path / 'f.py'}:build")


def test_torch_files_load_weights_only(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "full.pt")  # a pickled module needs arbitrary code
    with pytest.raises(ModelLoadError, match="needs arbitrary code to load; refused") as e:
        load_model(tmp_path / "full.pt")
    assert "--trust-remote-code" in e.value.hint
    assert isinstance(load_model(tmp_path / "full.pt", trust_remote_code=True), nn.Linear)
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="weights only"):
        load_model(tmp_path / "sd.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_model(tmp_path / "bad.pt")


def _tiny_bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)


def test_local_hf_encoder_directory(tmp_path):
    transformers, cfg = _tiny_bert_config()
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 64, (3, 7))
    emb = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert emb.shape == (3, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)  # mean-pooled, L2-normalised
    # an artifact of a HF model rebuilds from its directory
    path = save_artifact(model, tmp_path / "enc.safetensors")
    again, _ = load_artifact(path)
    assert torch.allclose(again(input_ids=ids, attention_mask=torch.ones_like(ids)), emb)


def test_local_hf_classifier_directory(tmp_path):
    transformers, cfg = _tiny_bert_config()
    cfg.num_labels = 3
    cfg.architectures = ["BertForSequenceClassification"]
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 64, (2, 5))
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).shape == (2, 3)
