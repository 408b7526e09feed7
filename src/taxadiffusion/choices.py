"""A string enum for a setting's named choices, with a parse that lists them on a bad value."""

from __future__ import annotations

import re
from enum import StrEnum

from .errors import InputError


class Choice(StrEnum):
    """Members are a setting's valid values; `parse` turns a string (or a member) into one."""

    @classmethod
    def parse(cls, value: str | Choice) -> Choice:
        try:
            return cls(value)
        except ValueError:
            label = re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()  # CropPolicy -> "crop policy"
            raise InputError(f"unknown {label} {value!r}; choose {', '.join(c.value for c in cls)}") from None
