"""Type and range checks of config dataclasses, in one place.

A config dataclass (`ModelConfig`, `TrainConfig`) declares each field's type in its annotation
and, in a table of rules beside it, the values a field may take beyond its type. `check_fields`
checks every field of an instance against both; `check_mapping` checks a mapping of overrides
(from a JSON/YAML file or `--set`) before it reaches the dataclass. Every bad value raises
`ConfigError` naming the field and the value:

    num_experts=True must be an integer, got a bool
    lr=nan must be a finite number
    restart_steps=5 must be a list of integers, got an int

The types are JSON's: `bool` is only true/false (never 0/1), `int` refuses bools, floats and
strings, `float` takes ints (stored as floats) but refuses bools, NaN and infinities,
`list[int]` is a list (or tuple) of such ints, `X | None` also takes None (null).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config value of the wrong type or outside its range; the message names the field."""


# A rule looks at a value of the right type: None when allowed, else what is wrong with it
# ("must be > 0"), to follow "name=value ".
Rule = Callable[[Any], "str | None"]


def at_least(low: float, *, strict: bool = False, why: str = "") -> Rule:
    """`value >= low` (`> low` when strict)."""
    def rule(value: Any) -> str | None:
        if value > low or (value == low and not strict):
            return None
        return f"must be {'>' if strict else '>='} {low}" + (f" ({why})" if why else "")
    return rule


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """`low <= value <= high`, either end excluded when open."""
    def rule(value: Any) -> str | None:
        above = value > low or (value == low and not low_open)
        below = value < high or (value == high and not high_open)
        if above and below:
            return None
        return f"must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return rule


def one_of(choices: Iterable[str]) -> Rule:
    allowed = list(choices)
    return lambda value: None if value in allowed else f"is not one of {allowed}"


def non_empty(value: Any) -> str | None:
    return None if value else "must not be empty"


# ---------------------------------------------------------------------------------------------
def check_fields(obj: Any, rules: Mapping[str, Rule]) -> None:
    """Check every field of the dataclass instance `obj` by its annotated type and its rule,
    storing the normalised value (an int given for a float field becomes a float)."""
    hints = field_types(type(obj))
    for name, hint in hints.items():
        value = check_value(name, getattr(obj, name), hint, rules.get(name))
        object.__setattr__(obj, name, value)


def check_mapping(cls: type, data: Any, rules: Mapping[str, Rule], *, what: str,
                  prefix: str = "") -> dict[str, Any]:
    """Check `data`, a mapping of some of `cls`'s fields to values (a config file, or the
    overrides of one), field by field; returns it normalised. `what` names the mapping in
    errors ("ModelConfig", "model"); `prefix` goes before each field name ("model.")."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of field: value, got {describe(data)}")
    hints = field_types(cls)
    unknown = [key for key in data if key not in hints]
    if unknown:
        raise ConfigError(unknown_fields_message(what, unknown, hints))
    return {name: check_value(f"{prefix}{name}", value, hints[name], rules.get(name))
            for name, value in data.items()}


def check_value(name: str, value: Any, hint: Any, rule: Rule | None = None) -> Any:
    """`value` normalised for the type `hint`, or ConfigError naming `name`. A rule on a
    list field applies to each element."""
    optional, hint = _split_optional(hint)
    if value is None and optional:
        return None
    if typing.get_origin(hint) is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}={shorten(value)} must be a list of integers, got "
                              f"{describe(value)}" + (" (or None)" if optional else ""))
        (item,) = typing.get_args(hint)
        return [check_value(f"{name}[{i}]", v, item, rule) for i, v in enumerate(value)]
    value = _check_type(name, value, hint, optional)
    complaint = rule(value) if rule is not None else None
    if complaint is not None:
        raise ConfigError(f"{name}={shorten(value)} {complaint}" + (" or None" if optional
                                                                     else ""))
    return value


def _check_type(name: str, value: Any, hint: Any, optional: bool) -> Any:
    or_null = " (or None)" if optional else ""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={shorten(value)} must be true or false, got "
                          f"{describe(value)}{or_null}")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{name}={shorten(value)} must be an integer, got "
                          f"{describe(value)}{or_null}")
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
            if math.isfinite(number):
                return number
            raise ConfigError(f"{name}={shorten(value)} must be a finite number{or_null}")
        raise ConfigError(f"{name}={shorten(value)} must be a number, got "
                          f"{describe(value)}{or_null}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={shorten(value)} must be a string, got "
                          f"{describe(value)}{or_null}")
    if typing.get_origin(hint) is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
        raise ConfigError(f"{name}={shorten(value)} must be a mapping of field: value, got "
                          f"{describe(value)}")
    if hint is Any:
        return value
    raise TypeError(f"config_check cannot check field {name} of type {hint}")  # a new type


def _split_optional(hint: Any) -> tuple[bool, Any]:
    """(`hint` allows None, `hint` without None)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return len(args) < len(typing.get_args(hint)), args[0]
    return False, hint


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# --- messages --------------------------------------------------------------------------------
_KINDS = {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list",
          tuple: "a list", dict: "a mapping", type(None): "null"}


def describe(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def shorten(value: Any, limit: int = 60) -> str:
    """repr of a value, cut to keep an error on one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_typed(text: str, limit: int = 60) -> str:
    """A string the user typed, as typed when it prints on one short line, else its repr."""
    return text if text.isprintable() and len(text) <= limit else shorten(text, limit)


def unknown_fields_message(what: str, unknown: list[Any], known: Iterable[str]) -> str:
    """'unknown training field 'stepz' (did you mean 'steps'?)', or for several names
    'unknown ModelConfig fields: [...] (did you mean 'a' -> 'b', ...?)'."""
    names = sorted(unknown, key=str)
    known = list(known)
    matches = {name: close[0] for name in names if isinstance(name, str)
               for close in [difflib.get_close_matches(name, known, n=1)] if close}
    if len(names) == 1:
        text = f"unknown {what} field {shorten(names[0])}"
        hint = ", ".join(repr(m) for m in matches.values())
    else:
        text = f"unknown {what} fields: {shorten(names, 200)}"
        hint = ", ".join(f"{name!r} -> {match!r}" for name, match in matches.items())
    return text + (f" (did you mean {hint}?)" if hint else "")
