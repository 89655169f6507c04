"""A table of named factories with their keyword options: the one registry behind ``structprune.methods`` and
``structprune.models`` (timm's ``create_model(name, **kwargs)``, scikit-learn's validated options)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import StructPruneError

T = TypeVar("T")


class Registry(Generic[T]):
    """Factories by name. ``kind`` names what they build in error messages ("method", "model")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def add(self, name: str, factory: Callable[..., T]) -> Callable[..., T]:
        """Register ``factory`` under ``name`` (a later registration of the same name replaces it)."""
        self._factories[name] = factory
        return factory

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """A decorator: ``@registry.register("name")`` on a factory adds it under that name."""
        return lambda factory: self.add(name, factory)

    def available(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def factory(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; an unknown name is an error that lists the names (and the closest)."""
        if name not in self._factories:
            close = difflib.get_close_matches(str(name), self.available(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise StructPruneError(f"{self.kind} must be one of {', '.join(self.available())}; got {name!r}{hint}")
        return self._factories[name]

    def options(self, name: str) -> dict[str, object]:
        """The keyword options of ``name``'s factory and their defaults."""
        return {p.name: p.default for p in inspect.signature(self.factory(name)).parameters.values()}

    def accepts(self, name: str, option: str) -> bool:
        """Whether ``name``'s factory takes the keyword ``option``."""
        return option in inspect.signature(self.factory(name)).parameters

    def create(self, name: str, **kwargs) -> T:
        """Build ``name`` with its options; an option the factory does not take is an error naming its options."""
        allowed = self.options(name)
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise StructPruneError(f"{self.kind} {name!r} has no option {', '.join(unknown)}; "
                                   f"its options are: {', '.join(allowed) or 'none'}")
        return self.factory(name)(**kwargs)
