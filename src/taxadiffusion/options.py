"""Settings fields that are also command-line options, as litgpt's typed configs become its CLI.

A settings dataclass declares each field with `option(...)`: its type (the annotation), default, allowed values
(a `Choice`) and help text live there once. `add_options` turns the fields into argparse options, so a default or
a choice list cannot drift between the library and the command line; `from_args` builds the settings back.
Light on purpose: `taxadiffusion --help` imports this, never torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, field

from .choices import Choice


def option(default, help: str, *, flag: str | None = None, choices: type[Choice] | None = None, metavar=None):
    """A dataclass field that is also an option: `--<name-with-dashes>` unless `flag` says otherwise."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "metavar": metavar})


def comma_list(text: str) -> tuple[str, ...]:
    """`order,family` -> ("order", "family"): how a tuple field reads from the command line."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _scalar(hint, metavar) -> type:
    """The type an option parses: `int | None` -> int; a tuple reads as a comma-separated list, or, given one
    metavar per element (`--window R0 R1`), as that many values of its element type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0] if isinstance(metavar, tuple) else comma_list
    return hint


def _flag(spec: dataclasses.Field) -> str:
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def option_fields(cls) -> list[dataclasses.Field]:
    return [spec for spec in dataclasses.fields(cls) if "help" in spec.metadata]


def add_options(parser: argparse.ArgumentParser, cls, *, unset: str | None = None) -> None:
    """One option per `option` field of `cls`. `unset`: options default to None (the value comes from elsewhere,
    e.g. a pipeline's saved sampling settings) and the help says so with this text; otherwise the field's
    default is the option's and the help shows it."""
    hints = typing.get_type_hints(cls)
    for spec in option_fields(cls):
        choices, metavar = spec.metadata["choices"], spec.metadata["metavar"]
        kind = _scalar(hints[spec.name], metavar)
        default = None if unset is not None or spec.default is MISSING else spec.default
        shown = unset if unset is not None else (None if default is None else f"default: {_shown(default)}")
        text = spec.metadata["help"] + (f" ({shown})" if shown else "")
        kwargs = {"dest": spec.name, "default": default, "help": text}
        if choices is not None:
            kwargs["choices"] = [member.value for member in choices]
        elif kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = kind
        if metavar is not None:
            kwargs["metavar"] = metavar
        if isinstance(metavar, tuple):
            kwargs["nargs"] = len(metavar)
        parser.add_argument(_flag(spec), **kwargs)


def given(args: argparse.Namespace, cls) -> dict:
    """The values of `cls`'s options in parsed `args` (every one, defaults included)."""
    return {spec.name: getattr(args, spec.name) for spec in option_fields(cls) if hasattr(args, spec.name)}


def from_args(cls, args: argparse.Namespace, **extra):
    """`cls` built from its options in `args`, plus `extra` fields that are not options."""
    return cls(**given(args, cls), **extra)
