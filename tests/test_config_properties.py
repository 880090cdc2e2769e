"""Random JSON values for every ModelConfig and TrainConfig field, through every way a config
is made (direct construction, config.json, a YAML/JSON run file, `--set field=value`): each
either loads into a config that holds the value as given, or raises ConfigError naming the
field on one line. Any other exception fails the test.

The oracle is written here from the annotations alone: a value whose JSON type does not fit
the field (a bool for an int, NaN for a float, a string for a number, ...) must be refused.
"""

from __future__ import annotations

import functools
import json
import math
import re
import types
import typing
from dataclasses import fields

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridlm import PRESETS, ConfigError, ModelConfig
from hybridlm.checkpoint import load_config
from hybridlm.config_check import as_typed
from hybridlm.train import TrainConfig, load_train_config
from hybridlm.train.config import parse_value, set_value

MODEL_HINTS = typing.get_type_hints(ModelConfig)
TRAIN_HINTS = typing.get_type_hints(TrainConfig)
MODEL_FIELDS = [f.name for f in fields(ModelConfig)]
TRAIN_FIELDS = [f.name for f in fields(TrainConfig)]
REQUIRED = {"data": "d", "out": "o"}  # the run fields without a default

FAST = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# A third of the values are of a kind some fields must refuse (bools, NaN, infinities, ints
# beyond any float, numbers as strings, containers), a third near the accepted values so that
# configs load too, a third any JSON at all.
WRONG_KINDS = [True, False, None, math.nan, math.inf, -math.inf, 10**400, -(10**400), 2**63,
               "3", "1e-3", "nan", "", 2.5, 0.0, [], [1, 2], [True], {}, {"a": 1}]
_near_valid = st.one_of(
    st.integers(-2, 70), st.floats(-1.0, 3.0),
    st.sampled_from(["moe", "dense", "zipf", "ema", "sigmoid", "aux_free", "expert_choice",
                     "A", "AM", "DE", "L", "cpu", "tiny", "sft", "wsd", "restarts", "fsdp"]),
    st.lists(st.integers(0, 20), max_size=4),
)
_any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)
json_values = st.one_of(st.sampled_from(WRONG_KINDS), _near_valid, _any_json)
model_fields = st.sampled_from(MODEL_FIELDS)
train_fields = st.sampled_from(TRAIN_FIELDS)


def fits(value, hint) -> bool:
    """Whether a JSON value has a type the annotation `hint` allows."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int
    if hint is float:
        if type(value) not in (int, float):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an int beyond any float
            return False
    if hint is str:
        return type(value) is str
    if typing.get_origin(hint) is list:
        return type(value) is list and all(fits(v, args[0]) for v in value)
    if typing.get_origin(hint) is dict:
        return type(value) is dict
    raise AssertionError(f"the oracle does not know {hint}")


def assert_names(err: ConfigError, *names: str, source: str = "") -> None:
    """One line that names one of `names`, not counting a `source` prefix ("--set x=y: "),
    which repeats what was typed and so would name the field whatever the error says (errors
    between fields, found once the whole run is read, come without it)."""
    message = str(err)
    assert "\n" not in message, message
    if source and message.startswith(f"{source}: "):
        message = message[len(source) + 2:]
    assert any(re.search(rf"(?<![\w.]){re.escape(n)}\b", message) for n in names), (
        f"{names} not named in {message!r}")


def assert_outcome(make, name: str, value, hint, *, named=None, source: str = "") -> None:
    """`make()` either returns a config holding `value` in `name` (and `value` fits `hint`),
    or raises ConfigError naming `named` (default: `name`)."""
    try:
        cfg = make()
    except ConfigError as err:
        assert_names(err, *(named or [name]), source=source)
        return
    assert fits(value, hint), f"{name}={value!r} was accepted"
    stored = cfg
    for part in name.split("."):
        stored = stored[part] if isinstance(stored, dict) else getattr(stored, part)
    assert stored == value


# --- direct construction and config.json ----------------------------------------------------
@FAST
@given(preset=st.sampled_from(sorted(PRESETS)), name=model_fields, value=json_values)
def test_model_field_by_construction(preset, name, value):
    assert_outcome(lambda: ModelConfig(**{**PRESETS[preset], name: value}), name, value,
                   MODEL_HINTS[name])


@FAST
@given(preset=st.sampled_from(sorted(PRESETS)), name=model_fields, value=json_values)
def test_model_field_from_config_json(tmp_path, preset, name, value):
    (tmp_path / "config.json").write_text(json.dumps({**PRESETS[preset], name: value}))
    assert_outcome(lambda: load_config(tmp_path), name, value, MODEL_HINTS[name])


@FAST
@given(data=json_values | st.dictionaries(model_fields | st.text(max_size=12), json_values,
                                          max_size=4))
def test_any_config_json_loads_or_names_a_field(tmp_path, data):
    (tmp_path / "config.json").write_text(json.dumps(data))
    try:
        cfg = load_config(tmp_path)
    except ConfigError as err:
        unknown = [k for k in data if k not in MODEL_FIELDS] if isinstance(data, dict) else []
        if unknown:  # named as given, whatever characters it has
            assert "unknown ModelConfig field" in str(err)
            assert any(repr(k)[:30] in str(err) for k in unknown), str(err)
        assert_names(err, *(MODEL_FIELDS if isinstance(data, dict) else ["ModelConfig"]),
                     "ModelConfig")
        return
    assert all(fits(v, MODEL_HINTS[k]) and getattr(cfg, k) == v for k, v in data.items())


@FAST
@given(name=train_fields, value=json_values)
def test_train_field_by_construction(name, value):
    assert_outcome(lambda: TrainConfig(**{**REQUIRED, name: value}), name, value,
                   TRAIN_HINTS[name])


# --- run files and --set --------------------------------------------------------------------
def _as_read(text: str):
    """What the run-file reader makes of `text` (YAML, with JSON's exponent floats)."""
    return parse_value(text)


@FAST
@given(name=train_fields, value=json_values, as_json=st.booleans())
def test_train_field_from_a_run_file(tmp_path, name, value, as_json):
    data = {**REQUIRED, name: value}
    text = json.dumps(data) if as_json else yaml.safe_dump(data)
    (tmp_path / "run.yaml").write_text(text)
    read = _as_read(text)[name]
    assert_outcome(lambda: load_train_config(tmp_path / "run.yaml"), name, read,
                   TRAIN_HINTS[name])


@FAST
@given(name=model_fields, value=json_values, as_json=st.booleans())
def test_model_override_from_a_run_file(tmp_path, name, value, as_json):
    data = {**REQUIRED, "model": {name: value}}
    text = json.dumps(data) if as_json else yaml.safe_dump(data)
    (tmp_path / "run.yaml").write_text(text)
    read = _as_read(text)["model"][name]
    assert_outcome(lambda: load_train_config(tmp_path / "run.yaml"), f"model.{name}", read,
                   MODEL_HINTS[name], named=[f"model.{name}", name])


_typed = st.text(max_size=10) | json_values.map(json.dumps) | json_values.map(str)


@FAST
@given(name=train_fields, text=_typed)
def test_train_field_from_set(name, text):
    read = set_value(name, text)
    item = f"{name}={text}"
    assert_outcome(lambda: load_train_config(None, REQUIRED, [item]), name, read,
                   TRAIN_HINTS[name], source=f"--set {as_typed(item)}")


@FAST
@given(name=model_fields, text=_typed)
def test_model_override_from_set(name, text):
    read = set_value(f"model.{name}", text)
    item = f"model.{name}={text}"
    assert_outcome(lambda: load_train_config(None, REQUIRED, [item]), f"model.{name}", read,
                   MODEL_HINTS[name], named=[f"model.{name}", name],
                   source=f"--set {as_typed(item)}")


@FAST
@given(item=st.text(max_size=20))
def test_any_set_argument_loads_or_is_one_line_error(item):
    try:
        load_train_config(None, REQUIRED, [item])
    except ConfigError as err:
        assert "\n" not in str(err)


# --- every field against every kind of value, deterministically -----------------------------
# The random tests above reach a given field with a given kind only now and then (NaN in
# grad_clip, the one float field without a range); this sweep reaches each pair every run.
def _set_text(value) -> str:
    return yaml.safe_dump(value).removesuffix("...\n").strip()


def _as_given(name, value):
    return value


def _via_set(name, value):
    return set_value(name, _set_text(value))  # what the field receives from --set


ENTRY_POINTS = {  # how a value reaches a field, and what it is when it gets there
    "ModelConfig(...)": (MODEL_FIELDS, MODEL_HINTS, "", _as_given,
                         lambda n, v: ModelConfig(**{n: v})),
    "ModelConfig.from_dict": (MODEL_FIELDS, MODEL_HINTS, "", _as_given,
                              lambda n, v: ModelConfig.from_dict({n: v})),
    "TrainConfig(...)": (TRAIN_FIELDS, TRAIN_HINTS, "", _as_given,
                         lambda n, v: TrainConfig(**{**REQUIRED, n: v})),
    "--set field=value": (TRAIN_FIELDS, TRAIN_HINTS, "", _via_set,
                          lambda n, v: load_train_config(None, REQUIRED,
                                                         [f"{n}={_set_text(v)}"])),
    "--set model.field=value": (MODEL_FIELDS, MODEL_HINTS, "model.", _via_set,
                                lambda n, v: load_train_config(
                                    None, REQUIRED, [f"model.{n}={_set_text(v)}"])),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_field_against_every_wrong_kind(entry):
    names, hints, prefix, received, make = ENTRY_POINTS[entry]
    for name in names:
        for value in WRONG_KINDS:
            assert_outcome(functools.partial(make, name, value), f"{prefix}{name}",
                           received(f"{prefix}{name}", value), hints[name],
                           named=[f"{prefix}{name}", name])


# --- the oracle itself ----------------------------------------------------------------------
@pytest.mark.parametrize("value, hint, expected", [
    (True, int, False), (3, int, True), (3.0, int, False), ("3", int, False),
    (3, float, True), (math.nan, float, False), (10**400, float, False), (True, float, False),
    (None, int | None, True), ([1, 2], list[int], True), ([1, True], list[int], False),
    (0, bool, False), ({}, dict[str, typing.Any], True),
])
def test_the_oracle(value, hint, expected):
    assert fits(value, hint) is expected
