"""Settings declared once, as dataclass field metadata, and everything derived from them.

A setting's flag, type, range, help, default (per task, derived from other settings), whether
it travels to clients and whether it must match when a run directory resumes are declared in
one place: the `setting(...)` metadata of a config dataclass's field (RunConfig, ServerConfig,
ClientConfig), or an `option(...)` in an algorithm's module (picked up into RunConfig from the
algorithm registry). From those declarations come the dataclasses' validation (`check_fields`),
the argparse flags (`add_arguments`), the TOML keys, the defaults of a resolved configuration
(`fill_defaults`, `field_values`), the resume check (`resume_mismatches`) and, in common/wire.py,
the proto conversion of RunConfig.

Adding a run setting (a worked example: `--warmup-rounds`, an int >= 0, default 0, on the wire
and checked on resume):
  1. its declaration, the field in common/config.py RunConfig (or, for an algorithm's own
     setting, `WARMUP = option("warmup_rounds", 0, "...", minimum=0, resume=True)` in the
     algorithm's module, listed in its `Algorithm(options=...)`):
         warmup_rounds: int = field(default=0, metadata=setting("rounds of ...", minimum=0, resume=True))
  2. the wire: `uint32 warmup_rounds = 42;` in protos/fedmeta/v1/coordinator.proto, then
     `python scripts/gen_protos.py` (tests/unit/test_settings.py fails until the proto has it).
Then --warmup-rounds, the TOML key warmup_rounds, its validation (server and client), describe()
and config.json, the Join message and the resume check all have it; code reads `run.warmup_rounds`
(an algorithm's step reads `inner.option(WARMUP)`). A server-only setting is one field in
server/options.py ServerConfig; a client setting one field in client/config.py ClientConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

KEY = "fedmeta.setting"  # the dataclass field metadata key
_KEEP: Any = object()  # "not given": take the field's own default
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
Values = Mapping[str, Any]


@dataclass(frozen=True)
class Setting:
    """One setting: a flag (--name), a TOML key (name), and the config field it fills.

    default: the flag's default; None means unset (optional, or derived: `per_task[task]`, else
    `derive(values)`). field_default: what the dataclass gets when built without it. invert: a
    --no-x flag for field x. to_field: the field's value from all values, when it is not the flag's
    value itself (a ModelSpec from --model, --norm, ...). resume: a run directory resumes only
    with the same value. no_help: a tri-state bool, with --no-<name> as well (default None).
    """

    name: str
    type: type
    help: str
    default: Any = None
    field: str | None = None  # None: an input to other fields only (e.g. --norm)
    field_default: Any = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    invert: bool = False
    per_task: Mapping[str, Any] | None = None
    derive: Callable[[Values], Any] | None = None
    to_field: Callable[[Values], Any] | None = None
    resume: bool = False
    required: bool = False
    metavar: str | None = None
    no_help: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_for(self, values: Values) -> Any:
        """The value when none is given: per task, else derived, else the flag's default."""
        if self.per_task is not None and values.get("task") in self.per_task:
            return self.per_task[values["task"]]
        if self.derive is not None:
            return self.derive(values)
        return self.default

    def field_value(self, values: Values) -> Any:
        if self.to_field is not None:
            return self.to_field(values)
        return not values[self.name] if self.invert else values[self.name]


def setting(help: str, *, name: str | None = None, type: type | None = None, default: Any = _KEEP,
            **kw: Any) -> dict[str, Any]:
    """Field metadata declaring the field's setting; the rest of Setting's fields as keywords.

    name: the flag and TOML key (default: the field's name; "no_<field>" with invert=True).
    type: the flag's type (default: the field's annotation, `X | None` taken as X).
    default: the flag's default (default: the field's; None when per_task or derive is given).
    """
    return {KEY: {"help": help, "name": name, "type": type, "default": default, **kw}}


def option(field: str, default: Any, help: str, *, invert: bool = False, **kw: Any) -> Setting:
    """An algorithm's own run setting, declared in its module (RunConfig gets it as a field)."""
    return Setting(name=("no_" + field) if invert else field, type=builtin_type(default), help=help,
                   default=(not default) if invert else default, field=field, field_default=default,
                   invert=invert, **kw)


def builtin_type(value: Any) -> type:
    if isinstance(value, bool):
        return bool
    for t in (int, float, str):
        if isinstance(value, t):
            return t
    raise TypeError(f"an option's default must be a bool, int, float or str, got {value!r}")


def _resolve(f: dataclasses.Field[Any]) -> Setting:
    spec = dict(f.metadata[KEY])
    field_default = None if f.default is dataclasses.MISSING else f.default
    flag_type = spec.pop("type")
    if flag_type is None:
        annotation = str(f.type).replace(" | None", "").replace("None | ", "")
        if annotation not in _TYPES:
            raise TypeError(f"setting {f.name}: give type= for a field of type {f.type}")
        flag_type = _TYPES[annotation]
    name = spec.pop("name") or (("no_" + f.name) if spec.get("invert") else f.name)
    default = spec.pop("default")
    if default is _KEEP:
        derived = spec.get("per_task") is not None or spec.get("derive") is not None
        default = None if derived else (not field_default) if spec.get("invert") else field_default
    return Setting(name=name, type=flag_type, default=default, field=f.name, field_default=field_default, **spec)


def settings_of(cls: type) -> tuple[Setting, ...]:
    """The settings declared on a dataclass's fields, in field order (cached on the class)."""
    cached = cls.__dict__.get("_settings_cache")
    if cached is None:
        cached = tuple(f.metadata[KEY] if isinstance(f.metadata.get(KEY), Setting) else _resolve(f)
                       for f in dataclasses.fields(cls) if KEY in f.metadata)
        cls._settings_cache = cached  # type: ignore[attr-defined]
    return cached  # type: ignore[no-any-return]


def with_options(options: Iterable[Setting]) -> Callable[[type], type]:
    """A class decorator, applied before @dataclass: adds each option as a field with its default."""

    def add(cls: type) -> type:
        annotations = cls.__dict__.get("__annotations__", {})  # the class's own, never a base's
        cls.__annotations__ = annotations
        for o in options:
            assert o.field is not None and o.field not in cls.__dict__, o.name
            annotations[o.field] = o.type.__name__
            setattr(cls, o.field, dataclasses.field(default=o.field_default, metadata={KEY: o}))
        return cls

    return add


def _bound(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def check_value(s: Setting, value: Any, *, optional: bool | None = None) -> Any:
    """Coerce (an int where a float is expected) and validate one value; ValueError naming the flag."""
    if value is None:
        if s.default is None if optional is None else optional:
            return None
        raise ValueError(f"{s.flag}: a value is required")
    expected = s.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ValueError(f"{s.flag}: expected {expected.__name__}, got {value!r}")
    if s.choices is not None and value not in s.choices:
        raise ValueError(f"{s.flag}: expected one of {', '.join(s.choices)}; got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{s.flag}: expected a finite number, got {value!r}")
    if s.minimum is not None and value < s.minimum:
        raise ValueError(f"{s.flag}: expected a value >= {_bound(s.minimum)}, got {value!r}")
    if s.positive and not value > 0:
        raise ValueError(f"{s.flag}: expected a positive number, got {value!r}")
    if s.maximum is not None and value > s.maximum:
        raise ValueError(f"{s.flag}: expected a value <= {_bound(s.maximum)}, got {value!r}")
    return value


def check_fields(obj: Any) -> None:
    """Validate a config dataclass's fields against their settings (call from __post_init__)."""
    for s in settings_of(type(obj)):
        if s.field is None or s.to_field is not None:
            continue
        value = getattr(obj, s.field)
        checked = check_value(s, value, optional=s.field_default is None)
        if checked is not value:
            object.__setattr__(obj, s.field, checked)


def fill_defaults(settings: Iterable[Setting], values: Values) -> dict[str, Any]:
    """Every setting's value: the given one, else its (per-task, derived) default, in declaration order."""
    settings = tuple(settings)
    out = {s.name: s.default for s in settings} | dict(values)
    for s in settings:
        if out[s.name] is None and (s.per_task is not None or s.derive is not None):
            out[s.name] = s.default_for(out)
    return out


def field_values(cls: type, values: Values) -> dict[str, Any]:
    """The keyword arguments of `cls` from resolved setting values."""
    return {s.field: s.field_value(values) for s in settings_of(cls) if s.field is not None}


def resume_mismatches(settings: Iterable[Setting], stored: Values, current: Values) -> list[str]:
    """The resume-checked fields whose stored and current values differ, as "field: checkpoint X, now Y".

    A checkpoint from before a setting existed lacks its key: it compares with the setting's
    default as it would have been derived from the checkpoint's own settings.
    """
    out = []
    for s in settings:
        if not s.resume or s.field is None:
            continue
        key = s.field
        if key in stored:
            old = stored[key]
        elif s.derive is None and s.per_task is None:
            old = s.field_default
        else:
            try:
                old = s.default_for(stored)
            except KeyError:  # the settings it derives from are missing too
                old = None
        if old != current.get(key):
            out.append(f"{key}: checkpoint {old!r}, now {current.get(key)!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser, settings: Iterable[Setting], *, typed: bool = False) -> None:
    """One flag per setting. typed=False: values stay text for `parse_flag` (one message style
    for flags and TOML); typed=True: argparse converts them (argparse's own messages)."""
    for s in settings:
        if s.type is bool:
            if s.no_help is not None:
                group = parser.add_mutually_exclusive_group()
                group.add_argument(s.flag, dest=s.name, action="store_true", default=None, help=s.help)
                group.add_argument("--no-" + s.flag[2:], dest=s.name, action="store_false", help=s.no_help)
            else:  # untyped: None when not given, so a TOML file's value stays
                parser.add_argument(s.flag, action="store_true", default=s.default if typed else None, help=s.help)
            continue
        shown = "" if s.default is None else f" (default: {s.default})"
        metavar = s.metavar or (s.type.__name__.upper() if s.choices is None else "{" + ",".join(s.choices) + "}")
        if typed:
            parser.add_argument(s.flag, type=s.type, default=s.default, required=s.required, metavar=s.metavar,
                                choices=s.choices, help=s.help + shown)
        else:
            parser.add_argument(s.flag, type=str, default=None, metavar=metavar, help=s.help + shown)


def parse_flag(s: Setting, text: str) -> Any:
    try:
        value = s.type(text)
    except ValueError:
        raise ValueError(f"{s.flag}: expected {s.type.__name__}, got {text!r}") from None
    return check_value(s, value)
