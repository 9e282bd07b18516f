"""`Tally`: what an erasure or a retention sweep counted, as a dataclass of int fields."""

from __future__ import annotations

import dataclasses
from typing import Any


class Tally:
    """Mixed into a `@dataclass(slots=True)` whose fields are all counts."""

    __slots__ = ()

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def add(self, other: Any) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, int]:
        # A mixin cannot be typed as a dataclass instance; every subclass is one.
        counts: dict[str, int] = dataclasses.asdict(self)  # type: ignore[call-overload]
        return counts
