"""Named extensions (selection rules, update rules, state formats, layer types): a table from names
to objects."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Objects by their ``name`` attribute; ``of(name)`` refuses an unknown name in one line."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, item: T) -> T:
        """Make ``item`` available by its ``name``; returns it."""
        name = getattr(item, "name", "")
        if not name:
            raise ValueError(f"{type(item).__name__} has no name: set its attribute 'name'.")
        self[name] = item
        return item

    def of(self, name: str) -> T:
        """The object registered as ``name`` (``ValueError`` naming the registered ones)."""
        if name not in self:
            raise ValueError(f"Unknown {self.what} {name!r}: use one of {', '.join(self)}.")
        return self[name]
