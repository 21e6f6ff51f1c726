"""One registry type for everything modelpress looks up by name.

Methods, zoo models, datasets, model sources, tensor encodings, buildable module classes,
replayable rewrites, exporters and observers are each a :class:`Registry`. They share one
policy: a name is registered once; registering the *same* entry again is a no-op (a module
imported twice), registering a *different* entry under a taken name is a
:class:`~modelpress.core.errors.ConfigError`. Looking up an unknown name raises the
registry's own error type with the list of known names as the hint.

A registry may name *plugin* modules, imported on the first lookup: that is how the
packages above the core (methods, the zoo) fill registries the core defines without the
core importing them.

    >>> from modelpress.core.registry import Registry
    >>> colours = Registry("colour")
    >>> colours.register("red", 0xFF0000)
    16711680
    >>> colours.get("red"), "blue" in colours
    (16711680, False)
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    modelpress.core.errors.ConfigError: unknown colour 'blue'
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError, ModelpressError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, with the duplicate policy of the module docstring.

    ``error`` is the exception type raised for an unknown name; ``plugins`` are module names
    imported (once) before the first lookup, ``loader`` a function run then (for plugins that
    are found rather than named).
    """

    def __init__(self, kind: str, *, error: type[ModelpressError] = ConfigError,
                 plugins: tuple[str, ...] = (), loader: Callable[[], None] | None = None,
                 hint: str | None = None):
        self.kind = kind
        self.error = error
        self.plugins = plugins
        self.loader = loader
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._loaded = not plugins and loader is None

    # -- writing ---------------------------------------------------------------------------
    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` and return it (so it works as a decorator body)."""
        current = self._entries.get(name)
        if current is not None and current is not entry and current != entry:
            raise ConfigError(f"{self.kind} {name!r} is registered twice",
                              hint="choose another name, or unregister the first one")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated object."""
        return lambda entry: self.register(name, entry)

    # -- reading ---------------------------------------------------------------------------
    def load_plugins(self) -> None:
        """Import the plugin modules (once); they register their entries on import."""
        if self._loaded:
            return
        self._loaded = True  # set first: a plugin may look entries up while it is imported
        for module in self.plugins:
            importlib.import_module(module)
        if self.loader is not None:
            self.loader()

    def get(self, name: str) -> T:
        self.load_plugins()
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}",
                             hint=self.hint or f"known: {', '.join(self.names()) or 'none'}")
        return self._entries[name]

    def find(self, name: str) -> T | None:
        """The entry, or None (no error)."""
        self.load_plugins()
        return self._entries.get(name)

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` in registration order."""
        self.load_plugins()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._entries)
