"""One exception root for everything modelpress raises on purpose.

Every error carries a one-line cause (``str(err)``) and, when we know it, a hint
saying what to do. The CLI prints both and exits non-zero; Python callers can
catch :class:`ModelpressError` alone.
"""
from __future__ import annotations


class ModelpressError(Exception):
    """Root of all modelpress errors: ``message`` says what and where, ``hint`` what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # keep it one line
        return self.message.replace("\n", " ")


class ConfigError(ModelpressError):
    """A method config or recipe value is invalid (names the field path)."""


class ScopeError(ModelpressError):
    """A Scope pattern matched no layer, or selected layers the method cannot handle."""


class DataError(ModelpressError):
    """Data is missing, empty, malformed or contains NaN/Inf."""


class ModelLoadError(ModelpressError):
    """A model or checkpoint could not be found, parsed or trusted."""


class UnsupportedError(ModelpressError):
    """A layer type or model structure the method cannot handle."""


class ResourceError(ModelpressError):
    """A measurement or run needs more memory (or another resource) than the machine has."""


class MissingDependencyError(ModelpressError):
    """An optional dependency is not installed (names the extra to install)."""


def require(module: str, extra: str):
    """Import an optional dependency or raise naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise MissingDependencyError(
            f"optional dependency '{module}' is not installed",
            hint=f"install it with: pip install 'modelpress[{extra}]'",
        ) from exc
