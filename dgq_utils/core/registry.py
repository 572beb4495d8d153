"""Named extension points: a :class:`Registry` maps a method's name (what a recipe says) to its implementation
(how it is done), so adding a grouping method, an axis rule or a probability quantizer is one registration in
the module that implements it, and the recipe validation (:mod:`dgq_utils.config.recipe`) reads the registered
names instead of keeping its own list.

The registries: :data:`dgq_utils.core.grouping.GROUPING_METHODS`, :data:`dgq_utils.core.grouping.AXIS_RULES`,
:data:`dgq_utils.core.quantizers.PROB_QUANTIZERS`.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, Mapping, TypeVar

__all__ = ["Registry", "RegisteredNames", "suggest"]

T = TypeVar("T")


def suggest(word, options) -> str:
    """``" Did you mean 'x'?"`` for the option closest to ``word`` (case/dash-folded match first), else ``""``."""
    opts = [str(o) for o in options]
    folded = [o for o in opts if o.lower() == str(word).lower().replace("-", "_")]
    close = folded or difflib.get_close_matches(str(word), opts, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Mapping[str, T], Generic[T]):
    """An ordered, read-only mapping ``name -> implementation`` with one way in: :meth:`register`.

    ``what`` names the extension point in messages (``"grouping method"``); :meth:`lookup` raises a
    ``ValueError`` listing the registered names (in registration order) with a did-you-mean hint.
    """

    def __init__(self, what: str, plural: str | None = None):
        self.what = what
        self.plural = plural or f"{what}s"
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """``registry.register("name", impl)``, or as a decorator ``@registry.register("name")``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty string name; got {name!r}.")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered.")

        def add(e: T) -> T:
            self._entries[name] = e
            return e

        return add(entry) if entry is not None else add

    def unregister(self, name: str) -> T:
        """Remove ``name`` (a plug-in that is unloaded, a test that registered a method); returns its entry."""
        if name not in self._entries:
            raise KeyError(f"{self.what} {name!r} is not registered.")
        return self._entries.pop(name)

    def lookup(self, name: str) -> T:
        """The implementation registered as ``name``, or a ``ValueError`` naming the valid ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.what} {name!r}; valid {self.plural}: {', '.join(self._entries)}."
                             + suggest(name, self._entries)) from None

    def names(self, where: Callable[[T], bool] | None = None) -> tuple[str, ...]:
        """The registered names in registration order (those whose entry passes ``where``, if given)."""
        return tuple(n for n, e in self._entries.items() if where is None or where(e))

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


class RegisteredNames:
    """A class attribute that reads a registry's names when it is accessed, so a registration made after the
    class was defined counts (``ActQuantConfig.GROUPINGS``)."""

    def __init__(self, registry: Registry, where: Callable | None = None):
        self.registry, self.where = registry, where

    def __get__(self, obj, owner=None) -> tuple[str, ...]:
        return self.registry.names(self.where)
