"""One declaration per option: what it takes, its default, its help text and its flag, written once.

An `Option` is the only place an option is defined. Everything else is generated from it:

- as a field of a configuration dataclass (`field_of`), whose table in the gate's TOML file
  `server/config.py` reads with the option's `Value` (the type check and the range, errors naming the key);
- as a command-line flag (`add_flag`): the same check, run on the flag's text, and a help text that shows the
  declared default, so a help text never states a default the code does not have;
- in the README's configuration reference (`server/config.reference`), which a test keeps equal to the README.

A reader who greps an option's name (`max_images`, `--batch-size`) finds its one declaration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

OPTION = "option"  # the key of a dataclass field's metadata that holds its Option


@dataclass(frozen=True)
class Value:
    """A kind of value: how the reference names it, how a value is checked, and how a flag's text is read."""

    kind: str  # the reference's words for what is accepted, e.g. "integer >= 1"
    # A value from the file (or a flag's converted text) -> the config's value; ValueError naming `where`.
    check: Callable[[Any, str], Any]
    from_text: Callable[[str], Any] = str  # a flag's text -> a value for `check`
    switch: bool = False  # true or false: the flag is --name / --no-name
    choices: tuple[str, ...] | None = None  # shown by argparse, which also refuses anything else
    repeat: bool = False  # a list: the flag is given once per item

    def __call__(self, value: Any, where: str) -> Any:
        return self.check(value, where)


def integer(minimum: int) -> Value:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{where}: must be >= {minimum}, got {value}")
        return value

    return Value(f"integer >= {minimum}", check, int)


def number(minimum: float, strict: bool = True, maximum: float | None = None) -> Value:
    above = ">" if strict else ">="

    def check(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"{where}: must be {above} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{where}: must be in [{minimum:g}, {maximum:g}], got {value}")
        return float(value)

    kind = f"number {above} {minimum:g}" if maximum is None else f"number in [{minimum:g}, {maximum:g}]"
    return Value(kind, check, float)


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _texts(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(value))


BOOLEAN = Value("true or false", _boolean, switch=True)
TEXT = Value("string", _text)
TEXTS = Value("list of strings", _texts, repeat=True)


def text(kind: str, check: Callable[[str, str], Any]) -> Value:
    """A string, then `check(string, where)` (which returns the config's value)."""
    return Value(kind, lambda value, where: check(_text(value, where), where))


def texts(kind: str, check: Callable[[str, str], Any]) -> Value:
    """A list of strings, `check(item, where[i])` on each."""
    return Value(
        kind,
        lambda value, where: tuple(check(item, f"{where}[{i}]") for i, item in enumerate(_texts(value, where))),
        repeat=True,
    )


def choice(choices: tuple[str, ...]) -> Value:
    def check(value: Any, where: str) -> str:
        if value not in choices:
            raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")
        return value

    return Value(" | ".join(choices), check, choices=choices)


def optional(value: Value) -> Value:
    """`value`, or unset (the default None: someone else decides, which the option's `default_text` says)."""
    return dataclasses.replace(value, check=lambda v, where: None if v is None else value.check(v, where))


def mapping(key: str, value: Value, from_text: Callable[[str], dict[str, Any]] = json.loads) -> Value:
    """A table of `key = value` entries, given on the command line as `from_text` reads them."""

    def check(data: Any, where: str) -> dict[str, Any]:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a table, got {data!r}")
        return {str(k): value.check(v, f"{where}.{k}") for k, v in data.items()}

    return Value(f"table: {key} = {value.kind}", check, from_text)


@dataclass(frozen=True)
class Option:
    value: Value
    default: Any
    help: str
    flag: str | None = None  # "--max-images"; None: the config file only
    # The help's words for a default that is not one value ("the manifest's", "cores, 2 to 8").
    default_text: str | None = None
    from_text: Callable[[str], Any] | None = None  # a flag's own syntax ("CAT=T,..."), instead of the value's
    metavar: str | None = None
    # A secret: from the flag or this environment variable, never from a file, never shown in a repr.
    env: str | None = None
    required: bool = False  # no default: the flag or the config file must give it

    @property
    def dest(self) -> str:
        """The flag's attribute in argparse's namespace."""
        assert self.flag is not None, self
        return self.flag.removeprefix("--").replace("-", "_")

    def shown_default(self, toml: bool = False) -> str:
        """The default as the help (or, `toml`, the reference's TOML) writes it."""
        if self.required:
            return "required"
        if self.default_text is not None:
            return self.default_text
        if toml:
            return toml_literal(self.default)
        if isinstance(self.default, (tuple, list)):
            return ", ".join(map(str, self.default)) or "none"
        return toml_literal(self.default) if isinstance(self.default, bool) else str(self.default)

    def flag_type(self) -> Callable[[str], Any]:
        """argparse's `type`: the flag's text converted, then checked by the same rule as the file's value
        (what is returned is the converted text: the config file's loader checks it once more, merged)."""
        convert = self.from_text or self.value.from_text
        assert self.flag is not None, self
        flag, value = self.flag, self.value

        def parse(text: str) -> Any:
            try:
                converted = convert(text)  # an ArgumentTypeError (parse_thresholds') passes as it is
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {value.kind}, got {text!r}") from None
            one_item = value.repeat and self.from_text is None  # a repeated flag: its list has this one item
            try:
                value.check([converted] if one_item else converted, flag)
            except ValueError as e:  # argparse names the flag itself: `gun: ...` for --thresholds gun=2
                message = str(e).removeprefix(f"{flag}[0]: ").removeprefix(f"{flag}: ").removeprefix(f"{flag}.")
                raise argparse.ArgumentTypeError(message) from None
            return converted

        return parse


def field_of(option: Option) -> Any:
    """The dataclass field that declares `option` under the field's name (its key in the config file)."""
    default = option.default
    shown = option.env is None
    if isinstance(default, dict):  # mutable: a fresh copy per instance
        return dataclasses.field(default_factory=lambda: dict(default), repr=shown, metadata={OPTION: option})
    return dataclasses.field(default=default, repr=shown, metadata={OPTION: option})


def add_flag(parser: Any, option: Option, from_file: bool = False, help: str | None = None) -> None:
    """`option`'s flag on `parser` (a parser or a group of one), its help ending in the declared default.

    With `from_file`, the command also reads its options from a config file: the flag has no default of its
    own (None: not given) and none is required, so a flag left out keeps the file's value."""
    assert option.flag is not None, option
    words = help or option.help
    if option.required and from_file:
        words += " (required: here or in the config file)"
    elif not option.required:
        words += f" (default: {option.shown_default()})"
    kwargs: dict[str, Any] = {"help": words.replace("%", "%%")}  # argparse formats help with %
    if option.required and not from_file:
        kwargs["required"] = True
    else:
        appended = option.value.repeat and option.from_text is None  # argparse makes the list
        kwargs["default"] = None if from_file or appended else option.default
    if option.metavar:
        kwargs["metavar"] = option.metavar
    if option.value.switch:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = option.flag_type()
        if option.from_text is None and option.value.choices:
            kwargs["choices"] = option.value.choices
        if option.from_text is None and option.value.repeat:
            kwargs["action"] = "append"
    parser.add_argument(option.flag, **kwargs)


def toml_literal(value: Any) -> str:
    """`value` as it is written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "unset"
    return str(value)
