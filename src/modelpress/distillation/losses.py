"""Distillation losses: soft targets, feature hints, attention, relations, embeddings.

Every loss is a plain function of tensors (no state), except :class:`HintAdapter`, the small
learned layer FitNets puts between a student feature and the teacher feature it imitates.
Shape mismatches raise :class:`~modelpress.core.errors.DataError` naming both shapes.

* :func:`kd_loss` (Hinton et al. 2015): ``T**2 * KL(softmax(t/T) || softmax(s/T))``, batch mean;
  :func:`soft_hard_loss` mixes it with cross-entropy on labels;
  :func:`ensemble_probs` averages several teachers' softened probabilities (multi-teacher KD).
* :func:`hint_loss` + :class:`HintAdapter` (FitNets, Romero et al. 2015).
* :func:`attention_transfer_loss` (Zagoruyko & Komodakis 2017, p=2).
* :func:`rkd_distance_loss`, :func:`rkd_angle_loss` (relational KD, Park et al. 2019).
* :func:`embedding_cosine_loss`, :func:`embedding_mse_loss` for sentence encoders.

    >>> import torch
    >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
    >>> round(abs(float(kd_loss(t, t, T=4.0))), 5)
    0.0
    >>> bool(kd_loss(s, t, T=4.0) > 0)
    True
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import DataError


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise DataError(f"{what}: student shape {tuple(a.shape)} != teacher shape {tuple(b.shape)}",
                        hint="student and teacher must predict the same classes / embedding width")


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits of any rank as (positions, classes): per-token logits count one row per token."""
    return logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits


# -- soft targets -----------------------------------------------------------------------
def kd_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """``T**2 * KL(teacher_probs || softmax(student_logits / T))``, mean over rows.

    ``teacher_probs`` are already softened at temperature ``T`` (e.g. from :func:`ensemble_probs`).
    The ``T**2`` keeps the gradient scale independent of ``T`` (Hinton et al.).

        >>> import torch
        >>> p = torch.softmax(torch.tensor([[2.0, 0.0]]) / 2, dim=1)
        >>> round(float(kd_loss_from_probs(torch.tensor([[2.0, 0.0]]), p, T=2)), 6)
        0.0
    """
    _same_shape(student_logits, teacher_probs, "kd loss")
    log_q = F.log_softmax(_as_rows(student_logits).float() / T, dim=-1)
    return F.kl_div(log_q, _as_rows(teacher_probs).float(), reduction="batchmean") * (T * T)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton's soft-target loss: ``T**2 * KL(softmax(t/T) || softmax(s/T))`` (batch mean).

        >>> import torch
        >>> s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> round(float(kd_loss(s, t, T=1.0)), 4)  # KL([.269,.731] || [.731,.269])
        0.4621
    """
    _same_shape(student_logits, teacher_logits, "kd loss")
    return kd_loss_from_probs(student_logits, F.softmax(teacher_logits.detach().float() / T, dim=-1), T)


def ensemble_probs(teacher_logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                   T: float = 4.0) -> torch.Tensor:
    """Weighted average of the teachers' softened probabilities (weights are normalised to sum 1).

        >>> import torch
        >>> a, b = torch.tensor([[10.0, -10.0]]), torch.tensor([[-10.0, 10.0]])
        >>> ensemble_probs([a, b], [3, 1], T=1.0).round(decimals=3).tolist()
        [[0.75, 0.25]]
    """
    if not teacher_logits:
        raise DataError("ensemble_probs needs at least one teacher output")
    weights = [1.0] * len(teacher_logits) if weights is None else list(weights)
    if len(weights) != len(teacher_logits):
        raise DataError(f"{len(weights)} teacher weights for {len(teacher_logits)} teachers",
                        hint="give one weight per teacher")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise DataError(f"teacher weights must be >= 0 with a positive sum (got {weights})")
    for i, t in enumerate(teacher_logits[1:], 1):
        if t.shape != teacher_logits[0].shape:
            raise DataError(f"teacher {i} output shape {tuple(t.shape)} != teacher 0 output shape "
                            f"{tuple(teacher_logits[0].shape)}", hint="all teachers must predict the same classes")
    return sum((w / total) * F.softmax(t.detach().float() / T, dim=-1) for w, t in zip(weights, teacher_logits))


def soft_hard_loss(student_logits: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None,
                   T: float = 4.0, alpha: float = 0.9, *, teacher_is_probs: bool = False) -> torch.Tensor:
    """``alpha * kd + (1 - alpha) * cross_entropy(student, target)``; pure kd when ``target`` is None.

    ``teacher`` is the teacher's logits, or its softened probabilities with ``teacher_is_probs``.

        >>> import torch
        >>> s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> torch.allclose(soft_hard_loss(s, t, y, T=2, alpha=1.0), kd_loss(s, t, T=2))
        True
    """
    kd = kd_loss_from_probs(student_logits, teacher, T) if teacher_is_probs else kd_loss(student_logits, teacher, T)
    if target is None or alpha == 1.0:
        return kd
    ce = F.cross_entropy(_as_rows(student_logits), target.reshape(-1))
    return alpha * kd + (1.0 - alpha) * ce


# -- FitNets hints ----------------------------------------------------------------------
class HintAdapter(nn.Module):
    """Learned map from a student feature to the teacher feature's shape (FitNets' regressor).

    2-D ``(B, C)`` and 3-D ``(B, N, C)`` features get a ``Linear(C_s, C_t)`` on the last
    dimension; 4-D ``(B, C, H, W)`` features a 1x1 ``Conv2d(C_s, C_t)``, then bilinear
    interpolation to the teacher's ``H x W`` when the spatial sizes differ.

        >>> import torch
        >>> a = HintAdapter(torch.zeros(2, 8, 14, 14), torch.zeros(2, 16, 7, 7))
        >>> a.proj, tuple(a(torch.zeros(2, 8, 14, 14)).shape)
        (Conv2d(8, 16, kernel_size=(1, 1), stride=(1, 1)), (2, 16, 7, 7))
    """

    def __init__(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor):
        super().__init__()
        s, t = student_feature, teacher_feature
        if s.dim() != t.dim() or s.dim() not in (2, 3, 4) or s.shape[0] != t.shape[0]:
            raise DataError(f"hint: cannot map a student feature of shape {tuple(s.shape)} to a teacher "
                            f"feature of shape {tuple(t.shape)}",
                            hint="pair layers whose outputs have the same rank (2-D, 3-D or 4-D) and batch size")
        if s.dim() == 3 and s.shape[1] != t.shape[1]:
            raise DataError(f"hint: student tokens {tuple(s.shape)} and teacher tokens {tuple(t.shape)} "
                            "differ in sequence length")
        self.size = tuple(t.shape[2:]) if s.dim() == 4 else None
        self.proj = nn.Conv2d(s.shape[1], t.shape[1], 1) if s.dim() == 4 else nn.Linear(s.shape[-1], t.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.size is not None and tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
              adapter: nn.Module | None = None) -> torch.Tensor:
    """FitNets: ``MSE(adapter(student_feature), teacher_feature)`` (no adapter: shapes must match).

        >>> import torch
        >>> s, t = torch.randn(4, 8), torch.randn(4, 16)
        >>> bool(hint_loss(s, t, HintAdapter(s, t)) > 0)
        True
    """
    out = adapter(student_feature) if adapter is not None else student_feature
    _same_shape(out, teacher_feature, "hint loss")
    return F.mse_loss(out.float(), teacher_feature.detach().float())


# -- attention transfer -----------------------------------------------------------------
def attention_map(feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Zagoruyko's spatial attention: ``mean_c |f|**p``, flattened and L2-normalised, ``(B, H*W)``."""
    if feature.dim() != 4:
        raise DataError(f"attention transfer needs (B, C, H, W) features, got shape {tuple(feature.shape)}",
                        hint="hint convolutional layers with hint_loss='attention'")
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Mean squared distance between normalised attention maps (channel counts may differ).

    The student map is average-pooled / interpolated to the teacher's ``H x W`` when they differ.
    The paper scales this by beta=1000 (use the method's ``hint_weight``).

        >>> import torch
        >>> f = torch.randn(2, 4, 6, 6)
        >>> round(float(attention_transfer_loss(f, torch.cat([f, f], dim=1))), 6)
        0.0
    """
    s, t = student_feature, teacher_feature
    if s.dim() == 4 and t.dim() == 4 and s.shape[2:] != t.shape[2:]:
        s = F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=False)
    a_s, a_t = attention_map(s, p), attention_map(t.detach(), p)
    _same_shape(a_s, a_t, "attention transfer")
    return (a_s - a_t).pow(2).mean()


# -- relational KD ----------------------------------------------------------------------
def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e)
    positive = d[d > 0]
    return d / (positive.mean() if positive.numel() else 1.0)


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber distance between the two batches' pairwise-distance matrices, each divided
    by its mean distance (so student and teacher widths may differ).

        >>> import torch
        >>> e = torch.randn(6, 4)
        >>> round(float(rkd_distance_loss(3 * e, e)), 6)  # scale-invariant
        0.0
    """
    s, t = student_emb.flatten(1).float(), teacher_emb.flatten(1).float().detach()
    if s.shape[0] != t.shape[0]:
        raise DataError(f"rkd: student batch {tuple(student_emb.shape)} != teacher batch {tuple(teacher_emb.shape)}")
    return F.smooth_l1_loss(_pairwise_distances(s), _pairwise_distances(t))


def _angles(e: torch.Tensor) -> torch.Tensor:
    # cos of the angle at j between i and k, for all (i, j, k): <e_i - e_j, e_k - e_j> normalised
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # diff[j, i] = e_i - e_j
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber distance between the cosines of the angles formed by every triplet.

        >>> import torch
        >>> e = torch.randn(5, 3)
        >>> round(float(rkd_angle_loss(2 * e + 1, e)), 6)  # invariant to scale and shift
        0.0
    """
    s, t = student_emb.flatten(1).float(), teacher_emb.flatten(1).float().detach()
    if s.shape[0] != t.shape[0]:
        raise DataError(f"rkd: student batch {tuple(student_emb.shape)} != teacher batch {tuple(teacher_emb.shape)}")
    return F.smooth_l1_loss(_angles(s), _angles(t))


# -- sentence embeddings ----------------------------------------------------------------
def embedding_cosine_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(student, teacher))`` per sentence.

        >>> import torch
        >>> e = torch.randn(3, 8)
        >>> round(abs(float(embedding_cosine_loss(2 * e, e))), 6)
        0.0
    """
    _same_shape(student_emb, teacher_emb, "embedding loss")
    return (1 - F.cosine_similarity(student_emb.float(), teacher_emb.detach().float(), dim=-1)).mean()


def embedding_mse_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the embeddings (MiniLM / DistilBERT-style distillation).

        >>> import torch
        >>> e = torch.zeros(2, 4)
        >>> float(embedding_mse_loss(e + 1, e))
        1.0
    """
    _same_shape(student_emb, teacher_emb, "embedding loss")
    return F.mse_loss(student_emb.float(), teacher_emb.detach().float())
