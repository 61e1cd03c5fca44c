"""`Registry`: the name -> entry table every registry of llmc is (ops, number formats, kernel sets,
kernels, passes, algorithms, observers, architectures, targets). Registering a name twice is a bug
and raises at import time, so two modules can never silently replace each other's entry."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what                               # what an entry is, for messages: "op", "target", ...

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def decorator(self, name: str, make: Callable[[Callable], T] = lambda fn: fn) -> Callable[[Callable], Callable]:
        """`@registry.decorator(name)`: registers `make(fn)` under `name` and leaves `fn` as it is."""
        def add(fn: Callable) -> Callable:
            self.add(name, make(fn))
            return fn
        return add
