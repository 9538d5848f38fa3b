"""User-facing error type: anything raised as `SpuriousError` is a bad input, shown as one line."""
from __future__ import annotations

from typing import Iterable


class SpuriousError(ValueError):
    """A user mistake (bad name, bad value, missing data); the CLI prints it on one line and exits 2."""


def check(rules: Iterable[tuple[bool, str]]) -> None:
    """Raise a SpuriousError with the message of the first rule `(holds, message)` that does not hold.

    Every settings dataclass (TrainConfig, the deletion, attack and tuning settings) validates its values
    this way in `__post_init__`; messages name the bad value and what is allowed.
    """
    for holds, message in rules:
        if not holds:
            raise SpuriousError(message)
