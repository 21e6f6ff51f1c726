"""Language modelling: blocks of token ids, next-token cross-entropy, perplexity on held-out text.

* data: :class:`TokenBlocks`, fixed-length blocks of token ids, each item
  ``{"input_ids": [block]}`` (the keyword inputs a Hugging Face causal LM takes, so calibration
  batches of the layer-wise methods feed it as they are);
* quality (:func:`lm_quality`): ``perplexity``, ``exp`` of the mean next-token negative
  log-likelihood over every predicted position of the held-out blocks (lower is better), and
  ``token_accuracy``, how often the most likely next token is the right one;
* training (:meth:`LanguageModelling.training_loss`): the text is its own label, so a compressed
  model fine-tunes on next-token cross-entropy (:func:`next_token_loss`), no reference needed.

The model is any module mapping token ids to ``[batch, positions, vocab]`` logits (e.g.
:class:`~modelpress.artifact.hf.HFLogits` around a ``...ForCausalLM``). A uniform model has
perplexity = vocabulary size:

    >>> import torch
    >>> from modelpress.tasks.language_modelling import LanguageModelling, TokenBlocks
    >>> class Uniform(torch.nn.Module):
    ...     def forward(self, input_ids):
    ...         return torch.zeros(*input_ids.shape, 16)
    >>> blocks = TokenBlocks(torch.randint(0, 16, (4, 8)))
    >>> round(LanguageModelling().evaluate(Uniform(), blocks)["perplexity"], 3)
    16.0
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..core.data import Data, call_model, output_tensor, slice_inputs
from ..core.errors import DataError
from .base import DatasetBundle, LossFn, Task


class TokenBlocks(Dataset):
    """Token ids as equal-length blocks (``[n, block]`` int64); item ``i`` is
    ``{"input_ids": ids[i]}``, so the default collate stacks items into a causal LM's inputs."""

    def __init__(self, ids: torch.Tensor):
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
            raise DataError(f"token blocks must be a non-empty [blocks, length >= 2] tensor, got {tuple(ids.shape)}",
                            hint="cut the token stream with TokenBlocks.from_stream(ids, block)")
        self.ids = ids.long()

    @classmethod
    def from_stream(cls, stream: torch.Tensor, block: int, max_blocks: int | None = None) -> "TokenBlocks":
        """Cut a 1-D token stream into consecutive non-overlapping blocks of ``block`` tokens (the
        incomplete tail is dropped); the first ``max_blocks`` only when given."""
        n = stream.numel() // block
        if n == 0:
            raise DataError(f"{stream.numel()} tokens make no block of {block}",
                            hint="use more text or a shorter block")
        if max_blocks is not None:
            n = min(n, max_blocks)
        return cls(stream[:n * block].reshape(n, block))

    @property
    def block(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def _ids_and_mask(inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(inputs, dict) and isinstance(inputs.get("input_ids"), torch.Tensor):
        return inputs["input_ids"], inputs.get("attention_mask")
    if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point():
        return inputs, None
    raise DataError(f"language modelling needs token ids (a tensor or {{'input_ids': ...}}), got "
                    f"{type(inputs).__name__}", hint="use TokenBlocks, or batches of int64 token ids")


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(summed negative log-likelihood, predicted positions, correct top-1 predictions)`` of
    the next tokens: position ``t``'s logits predict token ``t + 1``; positions whose target the
    ``attention_mask`` marks as padding are left out."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise DataError(f"a language model must return [batch, positions, vocab] logits for token ids "
                        f"{tuple(ids.shape)}, got {tuple(logits.shape)}",
                        hint="wrap the model so it returns next-token logits (e.g. HFLogits around a ...ForCausalLM)")
    if int(ids.max()) >= logits.shape[-1]:
        raise DataError(f"token id {int(ids.max())} is outside the model's vocabulary of {logits.shape[-1]}",
                        hint="tokenize the data with the model's own tokenizer (e.g. pylm-tiny goes with "
                             "pystdlib-tiny, pylm with pystdlib)")
    pred, target = logits[:, :-1].float(), ids[:, 1:]
    keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    nll = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    correct = (pred.argmax(-1) == target) & keep
    return nll[keep].sum(), keep.sum(), correct.sum()


@torch.no_grad()
def lm_quality(model: nn.Module, data: Any, batch_size: int = 16) -> dict[str, float]:
    """``perplexity`` (exp of the mean next-token NLL over all predicted positions) and
    ``token_accuracy`` of ``model`` on the token batches of ``data``."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    nll, count, correct = 0.0, 0, 0
    try:
        for inputs in Data(data, batch_size=batch_size).inputs():
            ids, mask = _ids_and_mask(inputs)
            call_inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else ids.to(device)
            logits = output_tensor(call_model(model, call_inputs))
            s, n, c = next_token_nll(logits, ids.to(logits.device), None if mask is None else mask.to(logits.device))
            nll, count, correct = nll + float(s), count + int(n), correct + int(c)
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("no token to predict in the evaluation data", hint="use blocks of at least 2 tokens")
    return {"perplexity": math.exp(nll / count), "token_accuracy": correct / count}


def next_token_loss() -> LossFn:
    """The training loss of a causal LM: mean next-token cross-entropy of its own inputs."""

    def loss_fn(model, inputs, target):
        ids, mask = _ids_and_mask(inputs)
        s, n, _ = next_token_nll(output_tensor(call_model(model, inputs)), ids, mask)
        return s / n.clamp(min=1)

    return loss_fn


class LanguageModelling(Task):
    """Causal language models on :class:`TokenBlocks`: quality is held-out ``perplexity`` (primary,
    lower is better) and ``token_accuracy``; training is next-token cross-entropy."""

    name = "language-modelling"
    metrics = ("perplexity", "token_accuracy")
    lower_is_better = frozenset({"perplexity"})
    labelled = False  # no label column: the text is its own target (see training_loss)

    def evaluate(self, model: nn.Module, data: Any, reference: nn.Module | None = None) -> dict[str, float]:
        return lm_quality(model, data)

    def training_loss(self, reference: nn.Module | None = None) -> LossFn | None:
        """Next-token cross-entropy on the data itself (``reference`` is not needed)."""
        return next_token_loss()

    def output_divergence(self, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """KL divergence of the next-token distributions, mean over positions."""
        return F.kl_div(F.log_softmax(output.float().flatten(0, -2), dim=-1),
                        F.log_softmax(reference.float().flatten(0, -2), dim=-1), log_target=True,
                        reduction="batchmean")

    def example_inputs(self, bundle: DatasetBundle, n: int = 1) -> Any:
        return slice_inputs(Data(bundle.test, batch_size=max(n, 1)).first_inputs(), n)
