"""The project's error classes. The CLI prints any `TaxaDiffusionError` as one line (exit 2); every other
exception is a bug and keeps its traceback.

Each class also derives from the builtin that describes it (`ValueError`, `FileNotFoundError`, ...), so
library callers can catch either.
"""

from __future__ import annotations


class TaxaDiffusionError(Exception):
    """A failure caused by the input (a value, a file, a folder), whose message says what to do."""

    def __str__(self) -> str:
        # KeyError-style subclasses would print their message in quotes; one plain line for everyone.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InputError(TaxaDiffusionError, ValueError):
    """A bad value or file content given by the user."""


class ConfigError(InputError):
    """A bad configuration value, with the key that holds it."""


class MissingInput(TaxaDiffusionError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not the kind of thing expected)."""


class UnreadableFile(TaxaDiffusionError, ValueError):
    """A file exists but cannot be parsed: truncated weights, bad JSON or YAML, undecodable text."""

    def __init__(self, path, problem: str, hint: str = ""):
        self.path = path
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


class OutputExists(TaxaDiffusionError, FileExistsError):
    """An output path holds something this command must not replace without being told to."""
