"""Name -> builder tables filled by a decorator (models, datasets), with one-line errors for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from kdtrain.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """`@REGISTRY.register("name")` adds an entry (twice is a bug); `get` names the closest entries on a miss.

    `load` imports the modules whose decorators fill the table, on first use (keeps imports cheap)."""

    def __init__(self, kind: str, load: Callable[[], None] = lambda: None):
        self.kind, self._load, self._items = kind, load, {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return wrap

    def names(self, extra: Iterable[str] = ()) -> list[str]:
        self._load()
        return sorted(self._items) + list(extra)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def get(self, name: str, key: str, extra: Iterable[str] = ()) -> T:
        """The entry `name`, or a UserError: `KEY=NAME is not a known KIND (did you mean ...?); known KINDs: ...`."""
        if name in self:
            return self._items[name]
        known = self.names(extra)
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"{key}={name} is not a known {self.kind}{hint}; known {self.kind}s: {', '.join(known)}")
