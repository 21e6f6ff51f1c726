"""The shared trainer: evaluation each epoch, best-weights keeping, and data-parallel runs under torchrun."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress import KD, Evaluation, TrainConfig, distill_from
from modelpress.core.errors import DataError
from modelpress.core.training import class_cross_entropy, evaluate_accuracy, fit

REPO = Path(__file__).resolve().parents[2]


def _data(n_batches=8, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * size, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_evaluation_runs_each_epoch_and_restores_the_best_weights():
    model, data = _mlp(), _data()
    scores = iter([0.5, 0.9, 0.7])  # epoch 2 is the best
    snapshots = {}

    class Snap:
        def on_step_end(self, step, m):
            snapshots[step + 1] = {k: v.clone() for k, v in m.state_dict().items()}

    ev = Evaluation(data=data, metric=lambda m, d: next(scores))
    fit(model, data, TrainConfig(epochs=3, lr=0.05), callbacks=[Snap()], evaluation=ev)
    assert [h["epoch"] for h in ev.history] == [1, 2, 3]
    assert [h["step"] for h in ev.history] == [8, 16, 24]
    assert ev.best == 0.9 and ev.best_epoch == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[16][k]), k
    assert not torch.equal(model[0].weight, snapshots[24]["0.weight"])


def test_evaluation_without_keep_best_keeps_the_last_weights_and_defaults_to_accuracy():
    model, data = _mlp(), _data()
    ev = Evaluation(data=data, keep_best=False)
    fit(model, data, TrainConfig(epochs=2, lr=0.05), evaluation=ev)
    assert len(ev.history) == 2 and all(0.0 <= h["metric"] <= 1.0 for h in ev.history)
    with pytest.raises(DataError, match="held-out data"):
        Evaluation(data=None)


def test_distillation_evaluates_the_student_each_epoch():
    teacher, data = _mlp(), _data()
    fit(teacher, data, TrainConfig(epochs=5, lr=0.05))
    ev = Evaluation(data=data)
    distill_from(nn.Linear(6, 3), teacher, data, KD(T=2.0), TrainConfig(epochs=2, lr=0.05), evaluation=ev)
    assert len(ev.history) == 2 and ev.best is not None


WORKER = textwrap.dedent("""
    import os, sys, torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    from core.test_training import _data, _mlp
    from modelpress.core.training import TrainConfig, fit
    rank = int(os.environ["RANK"])
    model = _mlp()
    if rank == 1:  # replicas must start from rank 0's weights whatever their own init
        with torch.no_grad():
            model[0].weight.add_(1.0)
    fit(model, _data(), TrainConfig(epochs=2, lr=0.1, optimizer="sgd", momentum=0.0, lr_schedule="constant"))
    torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
""")


def test_torchrun_two_processes_train_like_one_process_on_the_combined_batches(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODELPRESS_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # each step averages the gradients of batches 2k (rank 0) and 2k+1 (rank 1): the same as one
    # process stepping on their concatenation (equal batch sizes, mean losses)
    data = _data()
    combined = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(data[0::2], data[1::2])]
    ref = fit(_mlp(), combined, TrainConfig(epochs=2, lr=0.1, optimizer="sgd", momentum=0.0,
                                            lr_schedule="constant", distributed="off"))
    for k, v in ref.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(r0["0.weight"], _mlp().state_dict()["0.weight"])  # it trained


def test_per_position_labels_train_and_score_a_language_model_output():
    logits = torch.randn(2, 5, 7)
    target = torch.randint(0, 7, (2, 5))
    target[1, 3:] = -100  # padding
    kept = target != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], target[kept])
    torch.testing.assert_close(class_cross_entropy(logits, target), expected)
    with pytest.raises(DataError, match="one class per sample"):
        class_cross_entropy(logits, target[:, :4])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits

    acc = evaluate_accuracy(Fixed(), [(torch.zeros(2), target)])
    assert acc == pytest.approx(float((logits.argmax(-1) == target)[kept].float().mean()))


def test_a_model_ending_in_softmax_trains_and_distills_on_its_log_probabilities():
    """A Keras-style classifier outputs probabilities: cross-entropy and soft targets take their
    log, so training learns as on logits (the same loss values, to float rounding)."""
    from modelpress.core.training import as_logits
    from modelpress.distillation.kd import distillation_loss

    torch.manual_seed(0)
    z = torch.randn(16, 5)
    y = torch.randint(0, 5, (16,))
    assert torch.allclose(class_cross_entropy(torch.softmax(z, 1), y), F.cross_entropy(z, y), atol=1e-5)
    scores = torch.rand(4, 3) + 1
    assert as_logits(z) is z and as_logits(scores) is scores
    x = torch.randn(512, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    probs = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(-1))
    fit(probs, data, TrainConfig(epochs=15, lr=0.02))
    assert evaluate_accuracy(probs, data) > 0.9
    student = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(-1))
    fit(student, data, TrainConfig(epochs=15, lr=0.02), loss_fn=distillation_loss(probs, KD(T=4.0, alpha=1.0)))
    assert evaluate_accuracy(student, data) > 0.85
