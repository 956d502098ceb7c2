"""Command-line flags derived from a training config dataclass, so each default and help text is written once.

A field becomes `--field-name`; its help (and optional `choices`) sit next to it in
`field(metadata={"help": ...})`. A field without a default is a required flag, a bool field that
defaults to False is a switch, and every other flag shows its default in --help (unless its help
already says what the default means).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def flag(default: Any = dataclasses.MISSING, help: str = "", choices: list[str] | None = None) -> Any:
    """A config field with its command-line help (and choices) beside it; no default makes the flag required."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str | None) -> T:
    """Parse `argv` into an instance of the frozen config dataclass `cls`, one flag per field."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, name = types[f.name], "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool flag must default to False (it is a switch)")
            parser.add_argument(name, action="store_true", help=help_text)
        elif f.default is dataclasses.MISSING:
            parser.add_argument(name, type=kind, required=True, choices=f.metadata.get("choices"), help=help_text)
        else:
            if "default" not in help_text:
                help_text += " (default: %(default)s)"
            parser.add_argument(name, type=kind, default=f.default, choices=f.metadata.get("choices"), help=help_text)
    return cls(**vars(parser.parse_args(argv)))
