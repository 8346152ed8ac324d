"""A small name -> factory registry, one per extension family (models, augmentations, methods, ...)."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from advpipe.errors import AdvpipeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps unique names to objects; unknown names raise an AdvpipeError listing the choices."""

    def __init__(self, family: str) -> None:
        """Create an empty registry for the named family (used in error messages)."""
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj`` return a decorator. Duplicates raise."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"duplicate {self.family} name {name!r}")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        """Return the object registered under ``name`` or raise an error naming the choices."""
        try:
            return self._items[name]
        except KeyError as exc:
            raise AdvpipeError(
                f"unknown {self.family} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            ) from exc

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
