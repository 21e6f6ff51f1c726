"""Sparsity schedules: how sparse the model should be at each training step.

* ``OneShot``: the target at once (step 0).
* ``Constant``: the target from ``begin_step``, re-applied every ``frequency`` steps (TFMOT's
  ``ConstantSparsity``).
* ``Polynomial``: Zhu & Gupta's automated gradual pruning (AGP; TFMOT's ``PolynomialDecay``)::

      s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** power,  t_0 <= t <= t_end

  applied every ``frequency`` steps, and at ``t_end`` exactly ``s_f``.

    >>> from modelpress.pruning.schedules import Polynomial
    >>> s = Polynomial(initial_sparsity=0.0, begin_step=0, end_step=100, frequency=50)
    >>> [round(s.sparsity_at(t, final=0.9), 4) for t in (0, 50, 100)]
    [0.0, 0.7875, 0.9]
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from ..core.config import StrictModel


class OneShot(StrictModel):
    """Prune to the target once, before any fine-tuning."""

    kind: Literal["oneshot"] = "oneshot"

    def resolve(self, total_steps: int) -> "OneShot":
        return self

    def sparsity_at(self, step: int, final: float) -> float | None:
        return final if step == 0 else None


class Constant(StrictModel):
    """Hold the target sparsity from ``begin_step``, re-pruning every ``frequency`` steps."""

    kind: Literal["constant"] = "constant"
    begin_step: int = Field(0, ge=0)
    end_step: int | None = Field(None, ge=0, description="last pruning step; None = end of training")
    frequency: int = Field(100, ge=1)

    def resolve(self, total_steps: int) -> "Constant":
        return self

    def sparsity_at(self, step: int, final: float) -> float | None:
        if step < self.begin_step or (self.end_step is not None and step > self.end_step):
            return None
        return final if (step - self.begin_step) % self.frequency == 0 else None


class Polynomial(StrictModel):
    """AGP / polynomial decay from ``initial_sparsity`` to the target between two steps."""

    kind: Literal["polynomial"] = "polynomial"
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    begin_step: int = Field(0, ge=0)
    end_step: int | None = Field(None, ge=1, description="None = end_fraction of the training steps")
    end_fraction: float = Field(0.6, gt=0, le=1, description="used when end_step is None")
    frequency: int = Field(50, ge=1)
    power: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _order(self):
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise ValueError(f"end_step ({self.end_step}) must be > begin_step ({self.begin_step})")
        return self

    def resolve(self, total_steps: int) -> "Polynomial":
        """Fix ``end_step`` once the number of training steps is known."""
        if self.end_step is not None:
            return self
        end = max(self.begin_step + 1, int(round(total_steps * self.end_fraction)) - 1)
        return self.model_copy(update={"end_step": end})

    def sparsity_at(self, step: int, final: float) -> float | None:
        assert self.end_step is not None, "call resolve(total_steps) first"
        if step < self.begin_step or step > self.end_step:
            return None
        if step != self.end_step and (step - self.begin_step) % self.frequency:
            return None
        frac = (step - self.begin_step) / (self.end_step - self.begin_step)
        return final + (self.initial_sparsity - final) * (1.0 - frac) ** self.power


Schedule = Annotated[Union[OneShot, Constant, Polynomial], Field(discriminator="kind")]
