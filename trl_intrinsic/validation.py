"""Checks of configuration values: every refusal is a ``ValueError`` / ``TypeError`` naming the field, the
value and the fix, raised before any model loads.

A config lists its numeric fields as :class:`Range` rules and calls :func:`check_ranges` in
``__post_init__``; a NaN or infinite value is refused wherever a range is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Range", "check_choice", "check_ranges"]


@dataclass(frozen=True)
class Range:
    """A numeric field's valid values: ``low`` / ``high`` bounds (``None``: unbounded), open or closed.

    Attributes:
        name: the field.
        low, high: the bounds.
        low_open, high_open: whether the bound itself is excluded.
        integer: the value must be an ``int``.
        optional: ``None`` is accepted.
        fix: what to set instead, appended to the message.
    """

    name: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    fix: str = ""

    def describe(self) -> str:
        kind = "an int" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            interval = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            interval = f"{'>' if self.low_open else '≥'} {self.low:g}"
        elif self.high is not None:
            interval = f"{'<' if self.high_open else '≤'} {self.high:g}"
        else:
            interval = ""
        return f"{kind} {interval}".strip() + (" or None" if self.optional else "")

    def check(self, value: Any) -> None:
        if value is None and self.optional:
            return
        number_type = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_type):
            raise TypeError(f"`{self.name}` must be {self.describe()}, got {value!r}{self._fix()}")
        ok = math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ValueError(f"`{self.name}` must be {self.describe()}, got {value!r}{self._fix()}")

    def _fix(self) -> str:
        return f"; {self.fix}" if self.fix else "."


def check_ranges(config: Any, rules: Iterable[Range]) -> None:
    """Check ``getattr(config, rule.name)`` against every rule."""
    for rule in rules:
        rule.check(getattr(config, rule.name))


def check_choice(name: str, value: Any, choices: Iterable[Any], fix: str = "") -> None:
    """Refuse ``value`` unless it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}{'; ' + fix if fix else '.'}")
