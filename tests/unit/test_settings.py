"""Settings declared once (common/settings.py): the proto has every run setting, each algorithm's options
become RunConfig fields and flags, the resume check and the client flags come from the declarations,
and fedmeta.common.config and fedmeta.common.algorithms no longer import each other."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import fedmeta.client.cli as client_cli
from fedmeta.client.config import ClientConfig, default_data_seed
from fedmeta.common.algorithms import ALGORITHM_OPTIONS, ALGORITHMS, Algorithm, InnerConfig, collect_options
from fedmeta.common.algorithms.mamlpp import MSL
from fedmeta.common.config import RunConfig, run_settings
from fedmeta.common.models import ModelSpec
from fedmeta.common.proto import pb
from fedmeta.common.settings import (Setting, add_arguments, check_fields, field_values, fill_defaults, option,
                             parse_flag, resume_mismatches, setting, settings_of, with_options)
from fedmeta.server.config import OPTIONS, build, describe, resume_differences

ROOT = Path(__file__).resolve().parents[2]
_INTS = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT32,
         FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}
_UNSIGNED = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64}


def proto_mismatches(cls: type, message: Descriptor) -> list[str]:
    """What keeps `cls`'s fields from being the proto message's fields of the same names and compatible types."""
    hints = typing.get_type_hints(cls)
    declared = {s.field: s for s in settings_of(cls)}
    out = []
    for f in dataclasses.fields(cls):
        proto = message.fields_by_name.get(f.name)
        if proto is None:
            out.append(f"{f.name}: no field of that name in {message.full_name}")
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType")):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        s = declared.get(f.name)
        if kind is bool:
            ok = proto.type == FieldDescriptor.TYPE_BOOL
        elif kind is int:
            ok = proto.type in _INTS and not (proto.type in _UNSIGNED and (s is None or s.minimum is None
                                                                          or s.minimum < 0))
        elif kind is float:
            ok = proto.type == FieldDescriptor.TYPE_DOUBLE
        elif kind is str:  # a string, or an enum for a closed set (the transport encoding)
            ok = proto.type == FieldDescriptor.TYPE_STRING or (
                proto.type == FieldDescriptor.TYPE_ENUM and s is not None and s.choices is not None)
        elif kind is ModelSpec:
            ok = proto.type == FieldDescriptor.TYPE_MESSAGE and proto.message_type.name == "ModelSpec"
        else:
            ok = False
        if not ok:
            out.append(f"{f.name}: {kind} does not fit proto type {proto.type}")
    names = {f.name for f in dataclasses.fields(cls)}
    out += [f"{n}: in the proto but not a field" for n in message.fields_by_name if n not in names]
    return out


def test_every_run_setting_has_a_proto_field_of_a_compatible_type() -> None:
    assert proto_mismatches(RunConfig, pb.RunConfig.DESCRIPTOR) == []
    assert {o.field for o in ALGORITHM_OPTIONS} <= set(pb.RunConfig.DESCRIPTOR.fields_by_name)


def test_a_run_setting_without_its_proto_field_fails() -> None:
    """What happens when a new setting is declared but the proto is forgotten."""
    warmup = option("warmup_rounds", 0, "rounds of warm-up", minimum=0)

    @dataclass(frozen=True)
    @with_options((warmup,))
    class Extended(RunConfig):  # type: ignore[misc]
        pass

    assert proto_mismatches(Extended, pb.RunConfig.DESCRIPTOR) == [
        "warmup_rounds: no field of that name in fedmeta.v1.RunConfig"]

    @dataclass(frozen=True)
    class WrongType:
        shots: float = field(default=1.0, metadata=setting("a float where the proto has uint32"))

    assert proto_mismatches(WrongType, pb.RunConfig.DESCRIPTOR)[0].startswith("shots: ")


def test_each_algorithm_declares_its_options_and_they_become_fields_and_flags() -> None:
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    flags = {o.name: o for o in OPTIONS}
    by_algorithm = {name: {o.field for o in a.options} for name, a in ALGORITHMS.items() if a.options}
    assert by_algorithm == {"mamlpp": {"first_order_rounds", "msl", "lslr", "cosine_outer"},
                            "fedavg": {"local_steps", "local_lr"},
                            "perfedavg": {"local_steps", "local_lr", "perfedavg_variant"},
                            "metacurvature": {"curvature_bias", "curvature_first_order"},
                            "matchingnet": {"matching_fce", "matching_steps"},
                            "relationnet": {"relation_loss", "relation_pool", "relation_norm", "relation_hidden"}}
    for o in ALGORITHM_OPTIONS:
        assert o.field in fields and fields[o.field].default == o.field_default
        assert flags[o.name] is o
    assert flags["no_msl"].flag == "--no-msl" and flags["no_msl"].default is False
    run = build({"algorithm": "mamlpp", "no_msl": True, "first_order_rounds": 2, "run_dir": "runs/unit"}).run
    assert (run.msl, run.lslr, run.first_order_rounds) == (False, True, 2)
    inner = InnerConfig.from_run(run)
    assert inner.option(MSL) is False
    assert InnerConfig(steps=1, lr=0.1).option(MSL) is True  # absent: the declared default


def test_two_declarations_of_one_option_are_refused() -> None:
    maml = ALGORITHMS["maml"]
    a = dataclasses.replace(maml, name="a", options=(option("beta", 0.1, "a's beta"),))
    b = dataclasses.replace(maml, name="b", options=(option("beta", 0.2, "b's beta"),))
    with pytest.raises(TypeError, match="'beta' is declared twice"):
        collect_options([a, b])
    shared = option("beta", 0.1, "one declaration")
    assert collect_options([dataclasses.replace(maml, options=(shared,)), dataclasses.replace(b, options=(shared,))]) \
        == (shared,)


# ---- a setting declared once, end to end (the worked example of common/settings.py) ----------------


WARMUP = option("warmup_rounds", 0, "rounds of warm-up", minimum=0, resume=True)


@dataclass(frozen=True)
@with_options((WARMUP,))
class Demo:
    name: str = field(default="x", metadata=setting("a name", choices=("x", "y"), resume=True))
    ratio: float = field(default=0.5, metadata=setting("a ratio", maximum=1.0, derive=lambda v: 0.25))
    wide: bool = field(default=True, metadata=setting("not wide", invert=True))

    def __post_init__(self) -> None:
        check_fields(self)


def test_one_declaration_gives_the_flag_the_check_the_default_and_the_resume_key() -> None:
    settings = settings_of(Demo)
    assert [s.name for s in settings] == ["name", "ratio", "no_wide", "warmup_rounds"]
    assert [s.default for s in settings] == ["x", None, False, 0]  # ratio: derived
    parser = argparse.ArgumentParser()
    add_arguments(parser, settings)
    args = parser.parse_args(["--warmup-rounds", "3", "--no-wide"])
    given = {s.name: parse_flag(s, getattr(args, s.name)) if isinstance(getattr(args, s.name), str)
             else getattr(args, s.name) for s in settings if getattr(args, s.name) is not None}
    values = fill_defaults(settings, given)
    assert Demo(**field_values(Demo, values)) == Demo(name="x", ratio=0.25, wide=False, warmup_rounds=3)
    with pytest.raises(ValueError, match=r"^--warmup-rounds: expected a value >= 0, got -1$"):
        Demo(warmup_rounds=-1)
    with pytest.raises(ValueError, match=r"^--ratio: expected a value <= 1, got 2.0$"):
        Demo(ratio=2)
    assert Demo(ratio=1).ratio == 1.0 and isinstance(Demo(ratio=1).ratio, float)
    with pytest.raises(ValueError, match=r"^--warmup-rounds: expected int, got 'soon'$"):
        parse_flag(WARMUP, "soon")
    # The resume check: a checkpoint from before warmup_rounds existed compares with its default.
    assert resume_mismatches(settings, {"name": "x"}, {"name": "x", "warmup_rounds": 0}) == []
    assert resume_mismatches(settings, {"name": "x"}, {"name": "y", "warmup_rounds": 2}) == [
        "name: checkpoint 'x', now 'y'", "warmup_rounds: checkpoint 0, now 2"]


# ---- the resume check ---------------------------------------------------------------------------------


def test_the_resume_keys_are_those_declared_and_old_checkpoints_compare_with_defaults() -> None:
    assert {o.field for o in OPTIONS if o.resume} == {
        "algorithm", "task", "model", "seed", "rounds", "shots", "queries", "tasks_per_client", "inner_steps",
        "inner_lr", "outer_lr", "ways", "dim", "partition", "shards", "rotations", "first_order_rounds", "msl",
        "lslr", "cosine_outer", "local_steps", "local_lr", "perfedavg_variant", "eval_every", "eval_ways",
        "curvature_bias", "curvature_first_order", "clusters", "cluster_warmup",
        "matching_fce", "matching_steps", "relation_loss", "relation_pool", "relation_norm", "relation_hidden",
        "schedule"}
    current = describe(build({"task": "gaussian", "ways": 3, "run_dir": "runs/unit"}))
    newer = ("eval_every", "eval_ways", "clusters", "cluster_warmup", "matching_fce", "matching_steps",
             "relation_loss", "relation_pool", "relation_norm", "relation_hidden", "schedule")
    old = {k: v for k, v in current.items() if k not in newer}  # before they existed
    assert resume_differences(old, current) == []
    assert resume_differences(dict(old, ways=4), current) == ["ways: checkpoint 4, now 3",
                                                              "eval_ways: checkpoint 4, now 3"]
    assert resume_differences(current, dict(current, eval_queries=7, port=1)) == []  # not resume settings


def test_run_settings_are_the_run_config_fields_and_norm() -> None:
    names = [s.name for s in run_settings()]
    assert names[names.index("model") + 1] == "norm"
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"run_id"}
    assert {s.field for s in run_settings() if s.field} == fields


# ---- the client's flags ---------------------------------------------------------------------------------


def test_client_flags_come_from_client_config() -> None:
    parser = client_cli.build_parser()
    flags = {a for action in parser._actions for a in action.option_strings}
    for s in settings_of(ClientConfig):
        assert s.flag in flags
    assert {"--no-vmap", "--give-up-s", "--download", "--log-level", "--allow-model-import"} <= flags
    args = parser.parse_args(["--server", "h:1", "--client-id", "site-7", "--threads", "2"])
    values = fill_defaults(client_cli.SETTINGS, {s.name: getattr(args, s.name) for s in client_cli.SETTINGS})
    config = ClientConfig(**field_values(ClientConfig, values))
    assert config == ClientConfig(server="h:1", client_id="site-7", data_seed=default_data_seed("site-7"), threads=2)
    with pytest.raises(ValueError, match=r"^--threads: expected a value >= 0"):
        ClientConfig(server="h:1", client_id="c", data_seed=0, threads=-1)


# ---- no import circle -----------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """The modules a file imports anywhere (function bodies and TYPE_CHECKING blocks included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_algorithms_and_the_settings_do_not_import_the_config() -> None:
    files = [*sorted((ROOT / "common" / "algorithms").glob("*.py")), ROOT / "common" / "settings.py"]
    assert len(files) > 5
    for path in files:
        bad = {m for m in _imports(path) if m.startswith(("fedmeta.common.config", "fedmeta.common.wire", "fedmeta.server", "fedmeta.client",
                                                                  "common", "server", "client"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    assert not {m for m in _imports(ROOT / "common" / "settings.py") if m.startswith(("fedmeta.common", "common"))}


def test_settings_are_plain_data() -> None:
    s: Any = OPTIONS[0]
    assert isinstance(s, Setting) and dataclasses.is_dataclass(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.help = "changed"
