"""A name -> entry table: optimizers, learning-rate schedules, augmentation presets.

Entries are registered explicitly in the module that defines them, never by import side effects
elsewhere. A second entry under a taken name raises (torchvision's rule; timm only warns, and then a
later import silently replaces what a config names). The config reads a registry's names as the
allowed values of its option, so a new entry is a new choice everywhere at once.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind                      # in messages: "optimizer", "schedule", ...
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:  # a programming error, not a user's: fail at import
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        if name not in self._entries:  # a config is validated first; this catches direct API calls
            raise ConfigError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
