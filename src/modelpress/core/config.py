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

import contextvars
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError
from .limits import short


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
        suffix = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {short(got)})"
        parts.append(f"{where}: {msg}{suffix}")
    return "; ".join(parts)


# Nested configs are validated inside their parent's __init__: only the outermost one turns
# pydantic's error into a ConfigError, so the message carries the full key path.
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("modelpress_config_depth", default=0)
_prefix: contextvars.ContextVar[str | None] = contextvars.ContextVar("modelpress_config_prefix", default=None)


def _non_string_key(obj: Any, path: str, seen: set[int] | None = None) -> tuple[str, Any] | None:
    """``(path, key)`` of the first dict key that is not a string (YAML allows ``{1: 2}``, and
    pydantic would fail on it with a TypeError instead of a ValidationError), or None."""
    seen = set() if seen is None else seen
    if not isinstance(obj, (dict, list, tuple)) or id(obj) in seen:  # YAML anchors can make cycles
        return None
    seen.add(id(obj))
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        if isinstance(obj, dict) and not isinstance(k, str):
            return f"{path}.{k!r}", k
        found = _non_string_key(v, f"{path}.{k}", seen)
        if found:
            return found
    return None


class StrictModel(BaseModel):
    """Base of every validated config: unknown keys are errors, assignment is validated."""

    # allow_inf_nan=False: NaN slips through every range check (comparisons are False) and
    # an infinite epoch count or threshold is never what a user meant.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False,
                              arbitrary_types_allowed=True, allow_inf_nan=False)

    def __init__(self, **data: Any):
        token = _depth.set(_depth.get() + 1)
        try:
            super().__init__(**data)
        except ValidationError as err:
            if _depth.get() > 1:
                raise
            where = _prefix.get() or type(self).__name__
            raise ConfigError(format_validation_error(err, where),
                              hint=f"see help({type(self).__name__}) for allowed values") from None
        except TypeError as err:  # a nested mapping with a non-string key, built from Python
            if _depth.get() > 1 or "keywords must be strings" not in str(err):
                raise
            where = _prefix.get() or type(self).__name__
            bad = _non_string_key(data, where)
            raise ConfigError(f"{bad[0] if bad else where}: keys are strings",
                              hint="use strings as field names") from None
        finally:
            _depth.reset(token)

    def __setattr__(self, name: str, value: Any) -> None:
        # validate_assignment runs pydantic's validator: report its error like __init__ does
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, type(self).__name__),
                              hint=f"see help({type(self).__name__}) for allowed values") from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_defaults=False)

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None):
        """Build from a plain dict; errors name fields under ``where`` (e.g. a recipe key path)."""
        where = where or cls.__name__
        if d is not None and not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {type(d).__name__} {d!r}")
        bad = _non_string_key(d, where)
        if bad:
            raise ConfigError(f"{bad[0]}: keys are strings (got {type(bad[1]).__name__})",
                              hint="quote the key in YAML, or fix the indentation")
        token = _prefix.set(where)
        outer = _depth.set(0)
        try:
            return cls(**(d or {}))
        finally:
            _depth.reset(outer)
            _prefix.reset(token)


class MethodConfig(StrictModel):
    """Base of the config of a registered method. ``method`` is the registry name."""

    method: ClassVar[str] = ""
