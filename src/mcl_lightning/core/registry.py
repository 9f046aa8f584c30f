"""One small name -> object registry (backbones and methods use it) and the "choose one of" check.

    BACKBONES = Registry("backbone", example="backbone=resnet32")

    @BACKBONES.register("resnet32")
    def resnet32(num_classes: int = 100) -> StagedBackbone: ...

    BACKBONES.get("resnet32")   # unknown names raise one ConfigError listing the choices
"""

from __future__ import annotations

from typing import Callable, Generic, Iterable, TypeVar

from mcl_lightning.core.errors import ConfigError

T = TypeVar("T")


def check_choice(what: str, value: object, choices: Iterable[object], hint: str = "") -> None:
    """Raise one ConfigError naming ``value`` and every valid choice unless ``value`` is among them.

    ``what`` names the setting as the user writes it (``optim.scheduler``, ``method``, ...);
    ``hint`` may add an example (``e.g. backbone=resnet32``).
    """
    options = list(choices)
    if value not in options:
        suffix = f" ({hint})" if hint else ""
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(map(str, options))}{suffix}")


class Registry(Generic[T]):
    """Objects by name. ``kind`` names the setting in error messages (``backbone``, ``method``)."""

    def __init__(self, kind: str, example: str = "") -> None:
        self.kind, self.example = kind, example
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (names are unique)."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        check_choice(self.kind, name, self.names(), f"e.g. {self.example}" if self.example else "")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries
