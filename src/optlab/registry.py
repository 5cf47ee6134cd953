"""Name -> factory registries: one vocabulary per kind of plug-in (tasks, methods, probes, ...).

A registry is the single place a name is defined; config validation, the DVC matrix and error
messages read the allowed names from it instead of copying tuples across modules.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that is not registered (one line: the key, close match, allowed names)."""


class Registry(Generic[T]):
    """Named entries of one kind. ``register`` is a decorator; ``get`` raises :class:`UnknownName`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind}: {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        if name not in self._entries:
            raise UnknownName(unknown_message(key or self.kind, name, self.names()))
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def unknown_message(key: str, value: object, allowed: tuple[str, ...] | list[str]) -> str:
    hint = difflib.get_close_matches(str(value), list(allowed), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"{key}: unknown value {value!r}{extra}; allowed: {', '.join(allowed)}"
