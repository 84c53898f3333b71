"""A small name -> factory registry (the timm ``_registry`` pattern).

Registering a taken name fails loudly; asking for an unknown name fails with the
closest valid names, so a typo in a config never trains the wrong thing.

A registry may also have a *resolver*: a function called with a name that is not
registered yet, which may register it (the method registry imports
``package.module:Class`` names and entry points this way, so a user's own method
needs no change to fastssl). ``get``, ``meta`` and ``in`` all go through it, so every
caller that looks a name up (the config's validation, the trainer's builder) sees it.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A hint naming the closest valid choice(s), or listing them all."""
    near = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if near:
        return "did you mean " + " or ".join(repr(c) for c in near) + "?"
    return "valid: " + ", ".join(sorted(choices))


class Registry(Generic[T]):
    """Maps a name to an object (a class or factory) plus free-form metadata.

    ``resolver(registry, name) -> bool``: called for an unknown name; returns True when it
    registered ``name`` (False: not a name it knows). Errors it raises (an import that
    fails, a class that breaks the contract) reach the caller of ``get``/``meta`` unchanged.
    """

    def __init__(self, kind: str, resolver: Callable[["Registry[T]", str], bool] | None = None, hint: str = ""):
        self.kind = kind
        self.resolver = resolver
        self.hint = hint                    # appended to unknown-name errors (how to add one)
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
            self._items[name] = obj
            self._meta[name] = meta
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a method registered for one test, a user's class reloaded in a notebook)."""
        self._items.pop(name, None)
        self._meta.pop(name, None)

    def _resolve(self, name: str) -> bool:
        if name in self._items:
            return True
        return bool(self.resolver is not None and self.resolver(self, name) and name in self._items)

    def get(self, name: str) -> T:
        if not self._resolve(name):
            hint = f"; {self.hint}" if self.hint else ""
            raise KeyError(f"unknown {self.kind} {name!r}: {closest(name, list(self._items))}{hint}")
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            return self._resolve(name)
        except Exception:   # a name the resolver cannot import is not in the registry; get() shows why
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
