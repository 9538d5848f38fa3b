"""One tiny registry type shared by patterns, datasets and models."""
from __future__ import annotations

from typing import Callable, Generic, Iterable, TypeVar

from spurious.errors import SpuriousError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps descriptive names (and aliases) to objects; registration order is display order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, aliases: Iterable[str] = ()) -> Callable[[T], T] | T:
        """Register `obj` under `name` (usable as a decorator when `obj` is None); duplicates raise."""

        def add(item: T) -> T:
            for key in (name, *aliases):
                if key in self._items or key in self._aliases:
                    raise SpuriousError(f"duplicate {self.kind} name {key!r}")
            self._items[name] = item
            for alias in aliases:
                self._aliases[alias] = name
            return item

        return add if obj is None else add(obj)

    def canonical(self, name: str) -> str:
        """Return the registered name that `name` (a name or an alias) refers to."""
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise SpuriousError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.choices())}")

    def get(self, name: str) -> T:
        """Return the object registered under `name` or one of its aliases."""
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        """Return the registered names in registration order."""
        return list(self._items)

    def aliases(self, name: str) -> list[str]:
        """Return the aliases of registered name `name`."""
        return [a for a, target in self._aliases.items() if target == name]

    def choices(self) -> list[str]:
        """Return names and aliases, for error messages."""
        return [*self._items, *self._aliases]

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases
