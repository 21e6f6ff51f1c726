"""Distillation losses: hand-computed values, shapes of the hint adapters, shape errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modelpress.core.errors import DataError
from modelpress.distillation.losses import (
    HintAdapter,
    attention_map,
    attention_transfer_loss,
    embedding_cosine_loss,
    embedding_mse_loss,
    ensemble_probs,
    hint_loss,
    kd_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    soft_hard_loss,
)


def manual_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(v, T):
    e = [math.exp(x / T) for x in v]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_loss_is_T_squared_times_manual_kl(T):
    s_rows = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t_rows = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    expected = T * T * sum(manual_kl(softmax(t, T), softmax(s, T)) for s, t in zip(s_rows, t_rows)) / 2
    got = float(kd_loss(torch.tensor(s_rows), torch.tensor(t_rows), T=T))
    assert got == pytest.approx(expected, rel=1e-5)


def test_kd_loss_zero_for_identical_logits_and_grad_only_to_student():
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    assert float(kd_loss(t.detach(), t.detach())) == pytest.approx(0.0, abs=1e-5)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_soft_hard_mix():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    kd, ce = kd_loss(s, t, 3.0), F.cross_entropy(s, y)
    assert torch.allclose(soft_hard_loss(s, t, y, T=3.0, alpha=0.3), 0.3 * kd + 0.7 * ce)
    assert torch.allclose(soft_hard_loss(s, t, y, T=3.0, alpha=0.0), ce)
    assert torch.allclose(soft_hard_loss(s, t, None, T=3.0, alpha=0.3), kd)  # unlabelled: pure kd


def test_mismatched_logits_name_both_shapes():
    with pytest.raises(DataError, match=r"\(4, 10\).*\(4, 5\)"):
        kd_loss(torch.randn(4, 10), torch.randn(4, 5))
    with pytest.raises(DataError, match="teacher 1"):
        ensemble_probs([torch.randn(2, 3), torch.randn(2, 4)])


def test_ensemble_probs_weighted_average():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    p = ensemble_probs([a, b], [1.0, 3.0], T=2.0)
    assert torch.allclose(p, 0.25 * torch.softmax(a / 2, 1) + 0.75 * torch.softmax(b / 2, 1))
    assert torch.allclose(p.sum(1), torch.ones(3))


@pytest.mark.parametrize("s_shape,t_shape,layer", [
    ((4, 8), (4, 32), torch.nn.Linear),
    ((4, 6, 8), (4, 6, 12), torch.nn.Linear),
    ((4, 8, 14, 14), (4, 16, 7, 7), torch.nn.Conv2d),
    ((4, 8, 7, 7), (4, 16, 7, 7), torch.nn.Conv2d),
])
def test_hint_adapter_shapes(s_shape, t_shape, layer):
    s, t = torch.randn(s_shape), torch.randn(t_shape)
    adapter = HintAdapter(s, t)
    assert isinstance(adapter.proj, layer)
    c_s, c_t = (s_shape[-1], t_shape[-1]) if layer is torch.nn.Linear else (s_shape[1], t_shape[1])
    assert adapter.proj.weight.shape[:2] == (c_t, c_s)
    assert adapter(s).shape == t.shape
    loss = hint_loss(s, t, adapter)
    loss.backward()
    assert adapter.proj.weight.grad is not None and loss > 0


def test_hint_adapter_rejects_rank_mismatch():
    with pytest.raises(DataError, match=r"\(4, 8\).*\(4, 8, 3, 3\)"):
        HintAdapter(torch.randn(4, 8), torch.randn(4, 8, 3, 3))


def test_attention_transfer():
    f = torch.randn(2, 4, 8, 8)
    assert attention_map(f).shape == (2, 64)
    assert torch.allclose(attention_map(f).norm(dim=1), torch.ones(2))
    # same spatial energy whatever the channel count -> zero loss; a different map -> positive
    assert float(attention_transfer_loss(f, f.repeat(1, 3, 1, 1))) == pytest.approx(0.0, abs=1e-7)
    assert float(attention_transfer_loss(f, torch.randn(2, 16, 4, 4))) > 0  # student map resized to 4x4
    with pytest.raises(DataError):
        attention_map(torch.randn(2, 4))


def test_rkd_losses_invariances():
    e = torch.randn(8, 6)
    assert float(rkd_distance_loss(5 * e, e)) == pytest.approx(0.0, abs=1e-6)
    assert float(rkd_angle_loss(2 * e + 3, e)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 3)  # widths may differ
    assert float(rkd_distance_loss(other, e)) > 0 and float(rkd_angle_loss(other, e)) > 0


def test_embedding_losses():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert float(embedding_cosine_loss(s, t)) == pytest.approx(1.0)
    assert float(embedding_mse_loss(s, t)) == pytest.approx((1 + 4) / 2)
    with pytest.raises(DataError, match=r"\(1, 2\).*\(1, 3\)"):
        embedding_cosine_loss(s, torch.zeros(1, 3))
