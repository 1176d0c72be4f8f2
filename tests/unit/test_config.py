"""Configuration: the server's option table, TOML files, flags, one-line CLI errors, RunConfig and its proto."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import fedmeta.client.cli as client_cli
import fedmeta.server.cli as server_cli
from fedmeta.common.codec import DEFAULT_CHUNK_BYTES
from fedmeta.common.config import RunConfig, check_client_id
from fedmeta.common.models import ModelSpec
from fedmeta.common.proto import pb
from fedmeta.common.wire import model_spec_from_proto, model_spec_to_proto, run_config_from_proto, run_config_to_proto
from fedmeta.server.config import OPTIONS, ServerConfig, build, describe, load_toml, resolve


def parse(*argv: str) -> ServerConfig:
    return resolve(server_cli.build_parser().parse_args(list(argv)))


# ---- server.config.build --------------------------------------------------------------------------


def test_build_defaults_are_valid() -> None:
    config = build({"run_dir": "runs/unit"})
    assert config.rounds == config.run.rounds == 1500
    assert config.clients_per_round == 4 and config.min_clients == 1
    assert config.port == 50051 and config.host == "127.0.0.1"
    assert config.outer_lr == 3e-3  # MAML's default Adam learning rate
    assert config.run.algorithm == "maml" and config.run.task == "sinusoid"
    assert config.run.chunk_bytes == DEFAULT_CHUNK_BYTES and config.run.encoding == "float32"
    assert config.run_dir == Path("runs/unit") and config.run.run_id == "unit"
    assert describe(config)["run_dir"] == "runs/unit"
    for o in OPTIONS:  # every option's default passes its own validation
        assert o.flag.startswith("--") and o.help


def test_eval_shots_and_ways_default_to_training_and_norm_reaches_the_model() -> None:
    one_shot = build({"task": "omniglot", "shots": 1, "run_dir": "runs/x"})
    assert (one_shot.run.eval_shots, one_shot.run.eval_ways, one_shot.run.ways) == (1, 5, 5)
    assert one_shot.run.model.kwargs["norm"] == "support"  # Conv4's inductive default
    assert one_shot.run.eval_curve_tasks == 10
    snell = build({"task": "omniglot", "algorithm": "protonet", "ways": 20, "eval_ways": 5, "run_dir": "runs/x"})
    assert (snell.run.ways, snell.run.eval_ways) == (20, 5)
    assert describe(snell)["eval_ways"] == 5
    batch = build({"task": "omniglot", "norm": "batch", "run_dir": "runs/x"})
    assert batch.run.model.kwargs["norm"] == "batch"
    assert RunConfig(run_id="r", ways=7, task="gaussian").eval_ways == 7


def test_build_derived_defaults() -> None:
    local = build({"local_clients": 3, "run_dir": "runs/x"})
    assert local.clients_per_round == 3 and local.port == 0
    reptile = build({"algorithm": "reptile", "run_dir": "runs/x"})
    assert reptile.outer_lr == 1.0
    explicit = build({"clients_per_round": 6, "min_clients": 6, "port": 0, "outer_lr": 0.5, "run_dir": "runs/x"})
    assert (explicit.clients_per_round, explicit.min_clients, explicit.port, explicit.outer_lr) == (6, 6, 0, 0.5)


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"rounds": 0}, "--rounds"),
        ({"rounds": -3}, "--rounds"),
        ({"rounds": "10"}, "--rounds"),
        ({"rounds": True}, "--rounds"),
        ({"rounds": 2.5}, "--rounds"),
        ({"min_clients": 5}, "--min-clients"),
        ({"min_clients": 3, "clients_per_round": 2}, "--min-clients"),
        ({"clients_per_round": 0}, "--clients-per-round"),
        ({"algorithm": "sgd"}, "--algorithm"),
        ({"task": "imagenet"}, "--task"),
        ({"encoding": "int8"}, "--encoding"),
        ({"chunk_bytes": 1023}, "--chunk-bytes"),
        ({"chunk_bytes": (3 << 20) + 1}, "--chunk-bytes"),
        ({"round_deadline_s": -1.0}, "--round-deadline-s"),
        ({"round_deadline_s": float("nan")}, "--round-deadline-s"),
        ({"round_deadline_s": float("inf")}, "--round-deadline-s"),
        ({"inner_lr": 0.0}, "--inner-lr"),
        ({"inner_lr": -0.1}, "--inner-lr"),
        ({"outer_lr": 0.0}, "--outer-lr"),
        ({"inner_steps": -1}, "--inner-steps"),
        ({"shots": 0}, "--shots"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**63}, "--seed"),
        ({"port": 65536}, "--port"),
        ({"poll_timeout_s": 0.0}, "--poll-timeout-s"),
        ({"poll_timeout_s": 601.0}, "--poll-timeout-s"),
        ({"max_workers": 3}, "--max-workers"),
        ({"local_clients": -1}, "--local-clients"),
        ({"max_update_bytes": 0}, "--max-update-bytes"),
        ({"host": 127}, "--host"),
        ({"mode": "decentralized"}, "--mode"),
        ({"model": "resnet"}, "--model"),
        ({"ways": 1, "task": "gaussian"}, "--ways"),
        ({"dim": 0}, "--dim"),
        ({"partition": "random"}, "--partition"),
        ({"shards": 0}, "--shards"),
        ({"data_dir": "/no/such/dir"}, "--data-dir"),
        ({"download": True}, "--download"),
        ({"task": "omniglot", "local_clients": 2}, "--task omniglot"),
        ({"algorithm": "protonet"}, "--algorithm protonet"),
        ({"local_steps": 0}, "--local-steps"),
        ({"local_lr": -1.0}, "--local-lr"),
        ({"first_order_rounds": -1}, "--first-order-rounds"),
        ({"perfedavg_variant": "so"}, "--perfedavg-variant"),
        ({"eval_steps": -1}, "--eval-steps"),
        ({"norm_clip_factor": -1.0}, "--norm-clip-factor"),
        ({"norm_clip_factor": 0.5}, "--norm-clip-factor"),
        ({"norm_clip_factor": float("nan")}, "--norm-clip-factor"),
        ({"norm_clip_window": 0}, "--norm-clip-window"),
        ({"norm_clip_warmup": 0}, "--norm-clip-warmup"),
        ({"norm_clip_warmup": 9, "norm_clip_window": 8}, "--norm-clip-warmup"),
        ({"eval_shots": 0}, "--eval-shots"),
        ({"eval_curve_tasks": -1}, "--eval-curve-tasks"),
        ({"eval_ways": 1, "task": "omniglot"}, "--eval-ways"),
        ({"eval_ways": 10, "task": "omniglot"}, "--eval-ways 10"),
        ({"eval_ways": 10, "task": "gaussian", "algorithm": "anil"}, "--eval-ways 10"),
        ({"norm": "instance", "task": "omniglot"}, "--norm"),
        ({"norm": "group", "task": "gaussian"}, "--norm group"),
        ({"max_concurrent_rpcs": 7}, "--max-concurrent-rpcs"),
        ({"stream_idle_s": 0.0}, "--stream-idle-s"),
        ({"stream_idle_s": 601.0}, "--stream-idle-s"),
        ({"max_connection_idle_s": 0.5}, "--max-connection-idle-s"),
        ({"max_connection_age_s": 0.0}, "--max-connection-age-s"),
        ({"max_clients": 0}, "--max-clients"),
        ({"allowed_clients": "/no/such/file"}, "--allowed-clients"),
        ({"joins_per_s": 0.0}, "--joins-per-s"),
        ({"forget_client_s": 0.0}, "--forget-client-s"),
        ({"max_silent_rounds": 0}, "--max-silent-rounds"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]!r}" for k in v),
)
def test_build_rejects_invalid_values_naming_the_flag(values: dict[str, object], flag: str) -> None:
    with pytest.raises(ValueError) as info:
        build({"run_dir": "runs/unit", **values})
    assert str(info.value).startswith(flag + ":"), str(info.value)


def test_build_rejects_unknown_settings() -> None:
    with pytest.raises(ValueError, match="unknown setting 'epochs'"):
        build({"epochs": 3})


# ---- TOML files -------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedmeta.toml"
    path.write_text(text)
    return path


def test_load_toml_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'algorithm = "reptile"\nrounds = 7\ninner-lr = 1\nround_deadline_s = 2.5\nencoding = "float16"\n')
    values = load_toml(path)
    assert values == {"algorithm": "reptile", "rounds": 7, "inner_lr": 1.0, "round_deadline_s": 2.5, "encoding": "float16"}
    assert isinstance(values["inner_lr"], float)  # an integer where a float is expected is accepted as a float
    config = build({**values, "run_dir": str(tmp_path / "run")})
    assert config.run.algorithm == "reptile" and config.rounds == 7 and config.run.encoding == "float16"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("epochs = 3\n", "unknown key 'epochs'; allowed: admin_cert_name, admin_token_file, aggregator, algorithm, "),
        ('rounds = "10"\n', "--rounds: expected int, got '10'"),
        ("rounds = 0\n", "--rounds"),
        ("inner_lr = true\n", "--inner-lr"),
        ('algorithm = "sgd"\n', "--algorithm"),
        ("rounds = \n", "is not valid TOML"),
        ("[server\nrounds = 3\n", "is not valid TOML"),
    ],
    ids=["unknown-key", "string-for-int", "zero-rounds", "bool-for-float", "unknown-algorithm", "missing-value", "bad-table"],
)
def test_load_toml_errors_start_with_config(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_toml(path)
    message = str(info.value)
    assert message.startswith("--config: "), message
    assert fragment in message
    assert str(path) in message


def test_load_toml_unknown_key_lists_every_allowed_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_toml(write(tmp_path, "epochs = 3\n"))
    allowed = str(info.value).split("allowed: ", 1)[1]
    assert allowed.split(", ") == sorted(o.name for o in OPTIONS)


def test_load_toml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^--config: no such file: .*nope\.toml"):
        load_toml(tmp_path / "nope.toml")


def test_load_toml_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^--config: cannot read"):
        load_toml(tmp_path)  # a directory


# ---- flags over the file ------------------------------------------------------------------------


def test_flags_override_the_toml_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'rounds = 7\nshots = 3\nalgorithm = "fomaml"\nrun_dir = "{tmp_path / "run"}"\n')
    from_file = parse("--config", str(path))
    assert (from_file.rounds, from_file.run.shots, from_file.run.algorithm) == (7, 3, "fomaml")
    overridden = parse("--config", str(path), "--rounds", "9", "--algorithm", "reptile", "--inner-lr", "0.2")
    assert overridden.rounds == overridden.run.rounds == 9
    assert overridden.run.algorithm == "reptile" and overridden.outer_lr == 1.0
    assert overridden.run.inner_lr == 0.2
    assert overridden.run.shots == 3  # not on the command line: the file's value stays
    assert overridden.run_dir == tmp_path / "run"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--rounds", "zero"], "--rounds"),
        (["--rounds", "1.5"], "--rounds"),
        (["--inner-lr", "fast"], "--inner-lr"),
        (["--round-deadline-s", "inf"], "--round-deadline-s"),
        (["--port", "-1"], "--port"),
        (["--encoding", "fp8"], "--encoding"),
        (["--clients-per-round", "2", "--min-clients", "3"], "--min-clients"),
    ],
)
def test_bad_flag_values_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(*argv, "--run-dir", "runs/unit")
    assert str(info.value).startswith(flag + ":"), str(info.value)


def test_bad_flag_overrides_a_good_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, "rounds = 7\n")
    with pytest.raises(ValueError, match="^--rounds:"):
        parse("--config", str(path), "--rounds", "0")


# ---- one-line CLI errors ----------------------------------------------------------------------------


def one_line_error(capsys: pytest.CaptureFixture[str], main, argv: list[str]) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["--rounds", "zero"], "fedmeta-server: error: --rounds"),
        (["--min-clients", "9"], "fedmeta-server: error: --min-clients"),
        (["--algorithm", "sgd"], "fedmeta-server: error: --algorithm"),
        (["--config", "/nonexistent/fedmeta.toml"], "fedmeta-server: error: --config"),
        (["--no-such-flag"], "fedmeta-server: error: unrecognized arguments: --no-such-flag"),
    ],
)
def test_server_cli_error_is_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], prefix: str) -> None:
    assert one_line_error(capsys, server_cli.main, argv).startswith(prefix)


class _WorkerReached(Exception):
    """The client CLI accepted its arguments and went on to build a worker."""


class _NoWorker:
    def __init__(self, config: object) -> None:
        raise _WorkerReached(repr(config))


@pytest.fixture
def client_main(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    # No worker (and so no channel) and no global logging setup, whatever the arguments.
    monkeypatch.setattr(client_cli, "Worker", _NoWorker)
    monkeypatch.setattr(client_cli, "setup_logging", lambda *a, **k: None)
    return client_cli.main


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["--server", "localhost:50051", "--client-id", "bad id!"], "fedmeta-client: error: --client-id"),
        (["--server", "localhost:50051", "--client-id", "x" * 65], "fedmeta-client: error: --client-id"),
        (["--server", "localhost", "--client-id", "site-1"], "fedmeta-client: error: --server"),
        (["--server", "localhost:50051", "--client-id", "site-1", "--threads", "-1"], "fedmeta-client: error: --threads"),
        (["--server", "localhost:50051", "--client-id", "site-1", "--give-up-s", "0"], "fedmeta-client: error: --give-up-s"),
        (["--server", "localhost:50051", "--client-id", "site-1", "--device", "tpu"], "fedmeta-client: error: --device"),
        (["--client-id", "site-1"], "fedmeta-client: error: the following arguments are required: --server"),
        (["--server", "localhost:50051", "--client-id", "site-1", "--shard", "-1"], "fedmeta-client: error: --shard"),
        (["--server", "localhost:50051", "--client-id", "site-1", "--data-dir", "/no/such/dir"],
         "fedmeta-client: error: --data-dir"),
        (["--server", "localhost:50051", "--client-id", "site-1", "--download"], "fedmeta-client: error: --download"),
        (["--server", "localhost:50051", "--client-id", "site-1", "--vmap", "--no-vmap"],
         "fedmeta-client: error: argument --no-vmap"),
    ],
)
def test_client_cli_error_is_one_line(capsys: pytest.CaptureFixture[str], client_main, argv: list[str], prefix: str) -> None:  # type: ignore[no-untyped-def]
    assert one_line_error(capsys, client_main, argv).startswith(prefix)


def test_client_cli_accepts_good_arguments(client_main) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(_WorkerReached, match="site-1"):
        client_main(["--server", "10.0.0.5:50051", "--client-id", "site-1", "--data-seed", "4"])


def test_client_cli_passes_data_share_and_vmap_choice(client_main, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(_WorkerReached, match=r"data_dir='[^']+', shard=3") as info:
        client_main(["--server", "10.0.0.5:50051", "--client-id", "site-1", "--data-dir", str(tmp_path),
                     "--shard", "3", "--no-vmap"])
    assert "vectorize=False" in str(info.value)


@pytest.mark.parametrize("address", ["localhost:", "localhost:http", "localhost:99999"])
def test_client_cli_rejects_a_server_without_a_valid_port(capsys: pytest.CaptureFixture[str], client_main, address: str) -> None:  # type: ignore[no-untyped-def]
    line = one_line_error(capsys, client_main, ["--server", address, "--client-id", "site-1"])
    assert line.startswith("fedmeta-client: error: --server")


# ---- RunConfig and its proto ---------------------------------------------------------------------


def test_run_config_defaults_are_valid() -> None:
    run = RunConfig(run_id="r")
    assert run.algorithm == "maml" and run.model.name == "mlp" and run.inner_steps == 1


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("algorithm", "sgd", "--algorithm"),
        ("task", "imagenet", "--task"),
        ("encoding", "int8", "--encoding"),
        ("shots", 0, "--shots"),
        ("queries", -1, "--queries"),
        ("tasks_per_client", True, "--tasks-per-client"),
        ("eval_shots", 0, "--eval-shots"),
        ("eval_tasks_per_client", 0, "--eval-tasks-per-client"),
        ("eval_queries", 0, "--eval-queries"),
        ("rounds", 1.0, "--rounds"),
        ("inner_steps", -1, "--inner-steps"),
        ("eval_steps", 2.0, "--eval-steps"),
        ("inner_lr", 0.0, "--inner-lr"),
        ("inner_lr", float("nan"), "--inner-lr"),
        ("inner_lr", float("inf"), "--inner-lr"),
        ("chunk_bytes", 1023, "--chunk-bytes"),
        ("chunk_bytes", (3 << 20) + 1, "--chunk-bytes"),
        ("poll_timeout_s", 0.01, "--poll-timeout-s"),
        ("seed", -1, "--seed"),
        ("seed", 2**63, "--seed"),
        ("partition", "random", "--partition"),
        ("shards", 0, "--shards"),
        ("dim", 0, "--dim"),
    ],
)
def test_run_config_validation(field: str, value: object, flag: str) -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(run_id="r", **{field: value})  # type: ignore[arg-type]
    assert str(info.value).startswith(flag + ":"), str(info.value)


@pytest.mark.parametrize("client_id", ["site-1", "a", "A.b_c-9", "x" * 64])
def test_check_client_id_accepts(client_id: str) -> None:
    assert check_client_id(client_id) == client_id


@pytest.mark.parametrize("client_id", ["", "bad id!", "x" * 65, "a/b", "é"])
def test_check_client_id_rejects(client_id: str) -> None:
    with pytest.raises(ValueError, match="expected 1-64 characters"):
        check_client_id(client_id)


NON_DEFAULT = dict(
    run_id="run-42", algorithm="reptile", task="gaussian",
    model=ModelSpec("mlp", {"in_features": 1, "hidden": [8, 4], "out_features": 1}),
    shots=3, queries=11, tasks_per_client=6, inner_steps=0, inner_lr=0.125, seed=2**63 - 1, encoding="bfloat16",
    chunk_bytes=4096, eval_shots=2, eval_steps=0, eval_tasks_per_client=9, poll_timeout_s=0.75, rounds=33, eval_queries=17,
    ways=7, dim=3, partition="characters", shards=9, rotations=False,
    first_order_rounds=4, msl=False, lslr=False, cosine_outer=False, local_steps=2, local_lr=0.25, perfedavg_variant="hf", eval_every=7, val_tasks_per_client=9,
    curvature_bias="diagonal", curvature_first_order=True,
    eval_ways=7, eval_curve_tasks=3, clusters=3, matching_fce=True, matching_steps=5, relation_loss="ce",
    relation_pool="mean", relation_hidden=16, relation_norm=False,
    schedule="buffered", buffer_size=5, staleness_exponent=1.5,
    max_staleness=3,
)


def test_non_default_fixture_covers_every_field() -> None:
    defaults = RunConfig(run_id="r")
    assert {f.name for f in dataclasses.fields(RunConfig)} == set(NON_DEFAULT)
    same_as_default = [k for k, v in NON_DEFAULT.items() if getattr(defaults, k) == v]
    assert same_as_default == []


@pytest.mark.parametrize("config", [RunConfig(run_id="r"), RunConfig(**NON_DEFAULT)], ids=["defaults", "non-default"])  # type: ignore[arg-type]
def test_run_config_proto_round_trip(config: RunConfig) -> None:
    wire = run_config_to_proto(config).SerializeToString()
    back = run_config_from_proto(pb.RunConfig.FromString(wire))
    assert back == config


def test_model_spec_proto_rejects_non_object_kwargs() -> None:
    assert model_spec_from_proto(model_spec_to_proto(ModelSpec("mlp", {"hidden": [2]}))) == ModelSpec("mlp", {"hidden": [2]})
    assert model_spec_from_proto(pb.ModelSpec(name="mlp")) == ModelSpec("mlp", {})
    with pytest.raises(ValueError, match="JSON object"):
        model_spec_from_proto(pb.ModelSpec(name="mlp", kwargs_json="[1, 2]"))


def test_a_run_config_from_before_the_buffered_schedule_is_synchronous() -> None:
    msg = run_config_to_proto(RunConfig(run_id="r", schedule="buffered", buffer_size=3))
    msg.ClearField("schedule")
    msg.ClearField("buffer_size")  # an older coordinator sends neither
    back = run_config_from_proto(msg)
    assert back.schedule == "sync" and back.buffer_size == RunConfig(run_id="r").buffer_size
    with pytest.raises(ValueError, match="^--schedule buffered: mamlpp"):
        RunConfig(run_id="r", algorithm="mamlpp", schedule="buffered")
    with pytest.raises(ValueError, match="^--schedule buffered: needs --mode federated"):
        build({"run_dir": "runs/unit", "schedule": "buffered", "mode": "centralized"})
    with pytest.raises(ValueError, match="^--schedule buffered: --clusters needs synchronous rounds"):
        build({"run_dir": "runs/unit", "schedule": "buffered", "clusters": 2})


def test_run_config_from_proto_validates() -> None:
    msg = run_config_to_proto(RunConfig(run_id="r"))
    msg.encoding = 0  # ENCODING_UNSPECIFIED
    with pytest.raises(ValueError, match="encoding"):
        run_config_from_proto(msg)
    msg = run_config_to_proto(RunConfig(run_id="r"))
    msg.shots = 0
    with pytest.raises(ValueError, match="^--shots"):
        run_config_from_proto(msg)
