"""Student builders: shapes, teacher-initialised weights, untouched teachers, artifact reload."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress import load_artifact, save_artifact
from modelpress.core.errors import ConfigError, UnsupportedError
from modelpress.distillation.students import bert_student, every_kth, keep_layers, narrower, shallower
from modelpress.zoo.models import build_model

X = torch.randn(2, 1, 28, 28)


def test_every_kth_ends_at_the_last_layer():
    assert every_kth(6, 2) == [1, 3, 5]
    assert every_kth(6, 3) == [2, 5]
    assert every_kth(4, 1) == [0, 1, 2, 3]


def test_keep_layers_copies_teacher_weights_and_leaves_the_teacher_alone(tmp_path):
    teacher = nn.Sequential(nn.Linear(8, 8), nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]), nn.Linear(8, 2))
    student = keep_layers(teacher, "1", [0, 3])
    assert len(teacher[1]) == 4 and len(student[1]) == 2
    assert torch.equal(student[1][1].weight, teacher[1][3].weight)
    assert student(torch.randn(3, 8)).shape == (3, 2)
    again, header = load_artifact(save_artifact(student, tmp_path / "s.safetensors"), base_model=teacher)
    assert header["replay"][0]["method"] == "distill.keep_layers" and len(again[1]) == 2
    x = torch.randn(5, 8)
    assert torch.equal(again(x), student(x))


@pytest.mark.parametrize("keep", [[], [2, 1], [0, 9]])
def test_keep_layers_rejects_bad_indices(keep):
    teacher = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="indices"):
        keep_layers(nn.Sequential(teacher), "0", keep)


def test_keep_layers_names_the_stacks_when_the_path_is_wrong():
    model = build_model("resnet_small", blocks=2)
    with pytest.raises(ConfigError, match="layer1"):
        keep_layers(model, "layer9", [0])


def test_shallower_resnet_keeps_stage_heads_and_reloads(tmp_path):
    teacher = build_model("resnet_small", blocks=3).eval()
    student = shallower(teacher, every=2, example_inputs=X).eval()
    assert [len(getattr(student, f"layer{i}")) for i in (1, 2, 3)] == [2, 2, 2]
    assert [len(getattr(teacher, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert torch.equal(student.layer2[1].conv1.weight, teacher.layer2[2].conv1.weight)
    path = save_artifact(student, tmp_path / "s.safetensors")
    again, _ = load_artifact(path)  # from the zoo source (blocks=3), replaying the drops
    assert torch.equal(again(X), student(X))
    with pytest.raises(UnsupportedError, match="shape-preserving"):
        shallower(build_model("resnet_small"), 2, X)


def test_narrower_starts_from_the_teacher_and_halves_channels():
    teacher = build_model("resnet_small").eval()
    student = narrower(teacher, 0.5, X)
    assert student.conv1.out_channels == 8 and student.layer3[0].conv2.out_channels == 32
    assert student(X).shape == (2, 10)
    assert sum(p.numel() for p in student.parameters()) < 0.35 * sum(p.numel() for p in teacher.parameters())
    with pytest.raises(ConfigError, match="width"):
        narrower(teacher, 1.5, X)


@pytest.mark.nlp
def test_bert_student_from_minilm_keeps_three_layers_and_reloads(tmp_path):
    from modelpress.tasks.embedding import pair_sentences, tokenize
    from modelpress.zoo.corpora import load_sts_pairs

    teacher = build_model("minilm").eval()
    student = bert_student(teacher, every=2).eval()
    assert len(student.backbone.encoder.layer) == 3 == student.backbone.config.num_hidden_layers
    assert len(teacher.backbone.encoder.layer) == 6
    assert torch.equal(student.backbone.encoder.layer[2].output.dense.weight,
                       teacher.backbone.encoder.layer[5].output.dense.weight)
    tokens = tokenize(teacher.tokenizer, pair_sentences(load_sts_pairs())[:4])
    again, _ = load_artifact(save_artifact(student, tmp_path / "s.safetensors"))
    assert torch.allclose(again(**tokens), student(**tokens), atol=1e-6)
