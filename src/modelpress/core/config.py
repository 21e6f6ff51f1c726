"""Validated, round-trippable method configs.

Every method has one config class derived from :class:`MethodConfig` (pydantic). Configs
are validated on construction; an invalid value raises :class:`ConfigError` naming the
class, the field path, the allowed range and the value that was given::

    >>> from modelpress.pruning.magnitude import MagnitudePruning
    >>> MagnitudePruning(sparsity=1.2)
    Traceback (most recent call last):
    ...
    modelpress.core.errors.ConfigError: MagnitudePruning.sparsity: Input should be less than 1 (got 1.2)

Configs round-trip through plain dicts (``to_dict`` / ``from_dict``) and so through
YAML/JSON. Unknown keys are rejected. Nothing is ever ``eval``-ed or unpickled.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


def format_validation_error(err: ValidationError, prefix: str) -> str:
    """One line per problem: ``prefix.field.path: message (got value)``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = f"{prefix}.{loc}" if loc else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        suffix = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        parts.append(f"{where}: {msg}{suffix}")
    return "; ".join(parts)


class StrictModel(BaseModel):
    """Base of every validated config: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False,
                              arbitrary_types_allowed=True)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, type(self).__name__),
                              hint=f"see help({type(self).__name__}) for allowed values") from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_defaults=False)

    @classmethod
    def from_dict(cls, d: dict | None, where: str | None = None):
        try:
            return cls(**(d or {}))
        except ConfigError as err:
            if where:
                # re-anchor the path at the caller's location (e.g. a recipe key path)
                msg = str(err).replace(f"{cls.__name__}.", f"{where}.").replace(
                    f"{cls.__name__}:", f"{where}:")
                raise ConfigError(msg, hint=err.hint) from None
            raise


class MethodConfig(StrictModel):
    """Base of the config of a registered method. ``method`` is the registry name."""

    method: ClassVar[str] = ""
