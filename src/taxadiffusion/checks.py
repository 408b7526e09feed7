"""One way to check a setting. Every settings class (the run config's sections, the model, sampling) calls these
in its `__post_init__`; each raises `ConfigError` naming the setting's full key (`model.lora_rank`, `sample.window`)
and, for a named choice, the valid values and the closest one."""

from __future__ import annotations

import difflib
import math

from .choices import Choice
from .errors import ConfigError


def check_range(
    key: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low=False,
    open_high=False,
    optional=False,
) -> None:
    """Refuse a value outside [low, high] (ends open where asked), NaN or infinite, naming the key."""
    if value is None and optional:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        left = "(" if open_low else "["
        right = ")" if open_high else "]"
        bounds = f"in {left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{right}"
        raise ConfigError(f"{key} must be {bounds}, got {value!r}")


def check_integer(key: str, value, low: int | None = None) -> None:
    """An integer (not a bool) of at least `low`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def check_choice(key: str, value, choice: type[Choice]) -> None:
    """One of a `Choice`'s values; the message lists them and suggests the closest."""
    valid = [member.value for member in choice]
    if value in valid:
        return
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"{key} must be one of {', '.join(valid)}, got {value!r}{hint}")


def check_window(key: str, window) -> tuple[float, float]:
    """A guidance window: two fractions 0 <= r0 <= r1 <= 1 of the sampling schedule."""
    window = tuple(window)
    if len(window) != 2 or not all(isinstance(end, int | float) and not isinstance(end, bool) for end in window):
        raise ConfigError(f"{key} must be two fractions [r0, r1], got {list(window)}")
    if not 0.0 <= window[0] <= window[1] <= 1.0:
        raise ConfigError(f"{key}: the guidance window must satisfy 0 <= r0 <= r1 <= 1, got {list(window)}")
    return window
