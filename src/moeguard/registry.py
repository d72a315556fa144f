"""One registry class for every extension point (methods, strategies, modes, defenses,
families, task kinds, studies): register by name, look up with "did you mean", list sorted.

Built-ins live one per file and register on import (peft-style); ``loader`` names the module
whose import registers them, so a lookup never depends on what the caller happened to import.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from moeguard.errors import MoeguardError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """``what``: the noun in errors ("attribution method"); ``hint``: where the names are listed
    (e.g. "see `moeguard methods`"); ``reserved``: names no entry may take, and why (a name the
    outputs use for something else beside the entries')."""

    def __init__(self, what: str, *, loader: str | None = None, hint: str | None = None,
                 reserved: dict[str, str] | None = None):
        self.what, self.loader, self.hint, self.reserved = what, loader, hint, dict(reserved or {})
        self._items: dict[str, T] = {}
        self._loaded = loader is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before the import: the modules it imports register into us
            try:
                importlib.import_module(self.loader)
            except BaseException:
                self._loaded = False  # a failed import is retried (and fails loudly) next lookup
                raise

    def add(self, name: str, item: T, *, overwrite: bool = False) -> T:
        if name in self.reserved:
            raise MoeguardError(f"{self.what} name '{name}' is reserved: {self.reserved[name]}",
                                hint="register it under another name")
        if overwrite:   # a replacement of a built-in: they register first, or their import would refuse it
            self._load()
        if name in self._items and not overwrite and self._items[name] is not item:
            raise MoeguardError(f"{self.what} '{name}' is already registered",
                                hint="choose another name, or pass overwrite=True (to the register call) to replace it")
        self._items[name] = item
        return item

    def register(self, name: str, **kw) -> Callable[[T], T]:
        """Decorator form: ``@REG.register("name")``."""
        def wrap(item: T) -> T:
            return self.add(name, item, **kw)
        return wrap

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            hint = suggest(str(name), list(self._items))
            raise MoeguardError(f"unknown {self.what} '{name}'",
                                hint=f"{hint}{'; ' + self.hint if self.hint else ''}")
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[T]:
        return [self._items[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def remove(self, name: str) -> None:
        self._load()   # a built-in removed before any lookup stays removed
        self._items.pop(name, None)
