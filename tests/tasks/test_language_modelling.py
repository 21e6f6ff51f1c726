"""LanguageModelling: perplexity and token accuracy on hand-checkable cases, loss, divergence, points."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelpress.core.errors import DataError
from modelpress.search.study import quality_of
from modelpress.tasks import Classification, LanguageModelling, TokenBlocks


class FixedNextToken(nn.Module):
    """Predicts token 1 with probability 0.75 (token 0: 0.25) at every position, whatever came before."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.log(torch.tensor([0.25, 0.75]))
        return logits.expand(*input_ids.shape, 2)


def test_perplexity_and_accuracy_by_hand():
    # next tokens of [0, 1, 1, 0]: 1 (p .75), 1 (p .75), 0 (p .25); the first token is never predicted
    blocks = TokenBlocks(torch.tensor([[0, 1, 1, 0]]))
    q = LanguageModelling().evaluate(FixedNextToken(), blocks)
    assert q["perplexity"] == pytest.approx(math.exp(-(2 * math.log(0.75) + math.log(0.25)) / 3), rel=1e-6)
    assert q["token_accuracy"] == pytest.approx(2 / 3)
    # a padded target position is left out: only 1 (p .75) and 1 (p .75) count
    masked = [{"input_ids": torch.tensor([[0, 1, 1, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}]
    assert LanguageModelling().evaluate(FixedNextToken(), masked)["perplexity"] == pytest.approx(1 / 0.75, rel=1e-6)


def test_uniform_model_has_perplexity_of_the_vocabulary():
    class Uniform(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 50)

    blocks = TokenBlocks.from_stream(torch.randint(0, 50, (1000,)), block=32)
    assert len(blocks) == 31 and blocks.block == 32
    assert LanguageModelling().evaluate(Uniform(), blocks)["perplexity"] == pytest.approx(50, rel=1e-4)


def test_training_loss_is_log_perplexity_and_divergence_is_kl():
    task = LanguageModelling()
    ids = torch.tensor([[0, 1, 1, 0]])
    loss = task.training_loss()(FixedNextToken(), {"input_ids": ids}, None)
    assert float(loss) == pytest.approx(math.log(task.evaluate(FixedNextToken(), TokenBlocks(ids))["perplexity"]))
    a = torch.randn(2, 5, 7)
    assert float(task.output_divergence(a, a)) == pytest.approx(0, abs=1e-6)
    assert float(task.output_divergence(a, torch.randn(2, 5, 7))) > 0.05


def test_points_put_lower_perplexity_higher():
    lm, cls = LanguageModelling(), Classification()
    assert lm.primary == "perplexity" and "perplexity" in lm.lower_is_better
    assert lm.points({"perplexity": 12.0}) > lm.points({"perplexity": 13.0})
    assert quality_of({"perplexity": 12.5, "token_accuracy": 0.4}, lm) == -12.5  # search: a drop of 1 = +1 ppl
    assert quality_of({"accuracy": 0.98}, cls) == pytest.approx(98.0)  # unchanged for higher-is-better tasks


def test_wrong_vocabulary_or_output_is_a_data_error():
    blocks = TokenBlocks(torch.tensor([[0, 5, 9, 3]]))
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        LanguageModelling().evaluate(FixedNextToken(), blocks)
    with pytest.raises(DataError, match=r"\[batch, positions, vocab\]"):
        LanguageModelling().evaluate(nn.Flatten(), [torch.zeros(2, 4, dtype=torch.long)])
    with pytest.raises(DataError, match="non-empty"):
        TokenBlocks(torch.zeros(0, 4, dtype=torch.long))
