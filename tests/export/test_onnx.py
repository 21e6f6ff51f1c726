"""ONNX export of a CNN and of a Hugging Face BERT, checked in ONNX Runtime; atomic writes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.core.errors import ModelpressError
from modelpress.export.onnx import (
    OnnxExportError,
    OnnxMismatchError,
    check_onnx,
    export_onnx,
    onnx_inputs,
    ort_feeds,
    ort_session,
)


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


class MeanPooledBert(nn.Module):
    """A tiny random BERT with mean pooling over the attention mask (sentence embedding)."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=100)
        self.bert = transformers.BertModel(config)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def tokens(batch, seq, pad_from=None):
    ids = torch.randint(0, 100, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        mask[0, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_cnn_export_runs_in_ort_at_another_batch(tmp_path):
    model = tiny_cnn().train()
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx")
    assert path.exists() and model.training
    session = ort_session(path)
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_inputs()[0].shape[0] == "batch"
    assert check_onnx(path, model, torch.randn(5, 3, 16, 16)) < 1e-4


def test_cnn_export_with_the_dynamo_exporter(tmp_path):
    model = tiny_cnn()
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx", exporter="dynamo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]  # no external .data file
    assert check_onnx(path, model, torch.randn(3, 3, 16, 16)) < 1e-4


def test_bert_keyword_inputs_with_dynamic_batch_and_sequence(tmp_path):
    model = MeanPooledBert()
    # exported from one unpadded sequence, run on a padded batch of another length
    path = export_onnx(model, tokens(1, 5), tmp_path / "bert.onnx")
    session = ort_session(path)
    assert {i.name: i.shape for i in session.get_inputs()} == {
        "input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert check_onnx(path, model, tokens(3, 9, pad_from=4)) < 1e-4


def test_onnx_inputs_names_match_export():
    assert list(onnx_inputs(torch.zeros(2, 3))) == ["input"]
    assert list(onnx_inputs((torch.zeros(2), torch.zeros(2)))) == ["input_0", "input_1"]
    arrays = onnx_inputs(tokens(2, 4))
    assert list(arrays) == ["input_ids", "attention_mask"]
    assert arrays["input_ids"].dtype == np.int64


def test_check_onnx_catches_a_mismatch(tmp_path):
    model = nn.Linear(4, 2)
    path = export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    with torch.no_grad():
        model.bias += 1.0  # the model moved on, the file did not
    with pytest.raises(OnnxMismatchError, match="differs"):
        check_onnx(path, model, torch.randn(3, 4))


def test_check_onnx_relative_tolerance_follows_the_output_scale(tmp_path):
    # random-init Inception v3 outputs ~1e12: float32 sums in another order differ by ~1e2 there
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(1e6)
    x = torch.randn(3, 64)
    path = export_onnx(model, x, tmp_path / "m.onnx")
    assert check_onnx(path, model, x, atol=1e-4, relative=True) > 1e-4  # passes, though above atol
    with torch.no_grad():
        model[1].bias += 1e-3 * model(x).abs().max()  # a real miss is still one at that scale
    with pytest.raises(OnnxMismatchError, match="differs"):
        check_onnx(path, model, x, atol=1e-4, relative=True)


class FailsInForward(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


class FailsWhileExporting(nn.Module):
    """Runs eagerly, fails inside both exporters: the temp file exists when it fails."""

    def forward(self, x):
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError("cannot export me")
        return x + 1


@pytest.mark.parametrize("model", [FailsInForward(), FailsWhileExporting()])
def test_failed_export_keeps_the_old_file_and_leaves_no_temp(tmp_path, model):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(OnnxExportError) as info:
        export_onnx(model, torch.randn(2, 3), target, exporter="torchscript")
    assert isinstance(info.value, ModelpressError) and info.value.hint
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_ort_feeds_reports_a_missing_input(tmp_path):
    path = export_onnx(MeanPooledBert(), tokens(2, 4), tmp_path / "bert.onnx")
    with pytest.raises(OnnxExportError, match="attention_mask"):
        ort_feeds(ort_session(path), {"input_ids": torch.zeros(2, 4, dtype=torch.long)})
