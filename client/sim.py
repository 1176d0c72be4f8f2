"""fedmeta-sim: many virtual clients on a Ray cluster against a real coordinator.

The coordinator is an ordinary `python -m fedmeta.server` (started separately, with its own
--clients-per-round, --round-deadline-s, --min-clients): nothing is simulated inside it. This
driver joins once as the first virtual client to read the run (algorithm, model: the client's
own checks apply), sizes each actor (client/sim_plan.py: CPUs, GPUs, memory by algorithm),
places the actors over the cluster (SPREAD), and watches them: a dead actor is re-created with
the same virtual clients, which rejoin under their ids; the coordinator's deadline and quorum
carry the rounds it missed. Exit 0 when the coordinator says FINISHED, 1 with one line when it
cannot be reached or every virtual client stopped without it, 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fedmeta.client.config import ClientConfig
from fedmeta.client.retry import CoordinatorUnreachable, RetryPolicy
from fedmeta.client.sim_plan import (MIB, Estimate, SimConfig, VirtualClient, actor_count, concurrency, estimate,
                                     split, virtual_clients)
from fedmeta.client.sim_report import Ledgerless, summarize
from fedmeta.client.virtual import HostSettings, Ledger, VirtualClientHost, configure_actor_logging
from fedmeta.client.worker import ClientError, Shutdown, Worker
from fedmeta.common.cli import OneLineErrorParser, setup_logging
from fedmeta.common.settings import Setting, add_arguments, check_value, settings_of

PROG = "fedmeta-sim"
LOG_LEVEL = Setting("log_level", str, "this driver's log verbosity (the actors': --actor-log-level)", "info",
                    choices=("debug", "info", "warning", "error"))
ACTOR_LOG_LEVEL = Setting("actor_log_level", str, "the virtual clients' log verbosity", "error",
                          choices=("debug", "info", "warning", "error"))
PLACE_TIMEOUT_S = 300.0
FINISH_GRACE_S = 20.0
log = logging.getLogger("fedmeta.sim")


class SimError(RuntimeError):
    """The simulation cannot go on; the message is the driver's one line."""


class RayHost(VirtualClientHost):
    """The host as a Ray actor: knows its node, records updates in the ledger actor."""

    def __init__(self, clients: list[VirtualClient], settings: HostSettings, ledger: Any, actor: int,
                 incarnation: int) -> None:
        import ray

        configure_actor_logging(settings.log_level)  # in the actor's own process, not the driver's

        def record(event: dict[str, Any]) -> None:
            ray.get(ledger.record.remote(event), timeout=60)

        super().__init__(clients, settings, record=record, actor=actor, incarnation=incarnation,
                         node=ray.get_runtime_context().get_node_id())


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=(
        "Run many virtual fedmeta clients on a Ray cluster against a running coordinator; exit when the run "
        "finishes."))
    add_arguments(parser, (*settings_of(SimConfig), LOG_LEVEL, ACTOR_LOG_LEVEL), typed=True)
    return parser


def probe(config: SimConfig) -> tuple[Any, int]:
    """Join as the first virtual client: (the run's configuration, its meta-parameter count)."""
    first = virtual_clients(config)[0]
    client = ClientConfig(server=config.server, client_id=first.client_id, data_seed=first.data_seed,
                          shard=first.shard, tls_ca=config.tls_ca, retry=RetryPolicy(give_up_s=config.give_up_s))
    worker = Worker(client)
    try:
        run = worker.join()
        worker.leave()  # not sampled before its actor runs it; it rejoins from there under the same id
    except CoordinatorUnreachable as exc:
        raise SimError(f"cannot reach the coordinator at {config.server} (--server): {exc}") from None
    except ClientError as exc:
        raise SimError(str(exc)) from None
    finally:
        worker.session.close()
    return run, worker.max_param_bytes // 4


class Driver:
    """The actors, their replacements, and the end of the run."""

    def __init__(self, ray: Any, config: SimConfig, settings: HostSettings, plan: list[list[VirtualClient]],
                 memory: int) -> None:
        self.ray, self.config, self.settings, self.plan, self.memory = ray, config, settings, plan, memory
        self.ledger = ray.remote(Ledger).options(num_cpus=0, name="fedmeta-sim-ledger", get_if_exists=False).remote()
        self.handles: list[Any] = [None] * len(plan)
        self.incarnation = [0] * len(plan)
        self.lost: set[int] = set()
        self.placements: list[dict[str, Any]] = []
        self.nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}

    def _create(self, k: int) -> Any:
        c = self.config
        options: dict[str, Any] = {"num_cpus": c.cpus_per_actor, "num_gpus": c.gpus_per_actor, "memory": self.memory,
                                   "max_restarts": 0, "max_concurrency": 4, "scheduling_strategy": "SPREAD"}
        return self.ray.remote(RayHost).options(**options).remote(self.plan[k], self.settings, self.ledger, k,
                                                                  self.incarnation[k])

    def start(self, ks: list[int]) -> None:
        """Create and start actors ks; print where each landed."""
        refs = {}
        for k in ks:
            self.handles[k] = self._create(k)
            refs[k] = self.handles[k].start.remote()
        for k, ref in refs.items():
            try:
                info = self.ray.get(ref, timeout=PLACE_TIMEOUT_S)
            except self.ray.exceptions.GetTimeoutError:
                raise SimError(f"actor {k} was not placed within {PLACE_TIMEOUT_S:.0f} s: no node has "
                               f"{self.config.cpus_per_actor:g} CPU, {self.config.gpus_per_actor:g} GPU and "
                               f"{self.memory / MIB:.0f} MiB free (--cpus-per-actor, --gpus-per-actor, "
                               "--memory-per-actor-mb)") from None
            except self.ray.exceptions.RayError as exc:
                raise SimError(f"actor {k} failed to start: {str(exc).splitlines()[0]}") from None
            if info["node"] not in self.nodes:
                self.nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in self.ray.nodes()}
            info["address"] = self.nodes.get(info["node"], "?")
            self.placements.append(info)
            clients = self.plan[k]
            print(f"actor {k}{'' if self.incarnation[k] == 0 else f' (replacement {self.incarnation[k]})'}: "
                  f"{len(clients)} virtual clients {clients[0].client_id}..{clients[-1].client_id} on node "
                  f"{info['node'][:12]} ({info['address']}), pid {info['pid']}", flush=True)

    def statuses(self) -> dict[int, dict[str, Any]]:
        """Each live actor's status; a dead one is replaced (or, past --actor-restarts, given up)."""
        refs = {k: h.status.remote() for k, h in enumerate(self.handles) if k not in self.lost}
        out: dict[int, dict[str, Any]] = {}
        dead = []
        for k, ref in refs.items():
            try:
                out[k] = self.ray.get(ref, timeout=60)
            except self.ray.exceptions.GetTimeoutError:
                continue
            except self.ray.exceptions.RayActorError as exc:
                log.warning("actor %d died: %s", k, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                dead.append(k)
        for k in dead:
            self.ray.kill(self.handles[k], no_restart=True)
            if self.incarnation[k] >= self.config.actor_restarts:
                print(f"actor {k} died {self.incarnation[k] + 1} times (--actor-restarts {self.config.actor_restarts}); "
                      f"its {len(self.plan[k])} virtual clients are given up", flush=True)
                self.lost.add(k)
                continue
            self.incarnation[k] += 1
            self.start([k])
        return out

    def stop(self) -> None:
        for k, h in enumerate(self.handles):
            if k not in self.lost and h is not None:
                try:
                    self.ray.get(h.stop.remote(), timeout=30)
                except self.ray.exceptions.RayError:
                    pass

    def watch(self, poll_s: float = 1.0) -> tuple[int, str | None]:
        """Until the run finishes (0, None) or no virtual client can go on (1, why)."""
        finished_at: float | None = None
        while True:
            statuses = self.statuses()
            finished = sum(s["finished"] for s in statuses.values())
            running = sum(s["running"] for s in statuses.values())
            if finished and finished_at is None:
                finished_at = time.monotonic()
                log.info("the coordinator says FINISHED; waiting up to %.0f s for the other virtual clients",
                         FINISH_GRACE_S)
            if finished_at is not None and (running == 0 or time.monotonic() - finished_at > FINISH_GRACE_S):
                return 0, None
            if len(self.lost) == len(self.plan):
                return 1, "every actor died more often than --actor-restarts allows"
            if running == 0 and not finished and len(statuses) == len(self.plan) - len(self.lost):
                errors = [s["first_error"] for s in statuses.values() if s["first_error"]]
                return 1, ("every virtual client stopped before the run finished"
                           + (f": {errors[0]}" if errors else ""))
            time.sleep(poll_s)

    def events(self) -> list[dict[str, Any]]:
        try:
            return list(self.ray.get(self.ledger.events.remote(), timeout=60))
        except self.ray.exceptions.RayError as exc:
            raise Ledgerless(str(exc)) from None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Shutdown(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = SimConfig(**{s.name: check_value(s, getattr(args, s.name)) for s in settings_of(SimConfig)})
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return simulate(config, args.actor_log_level)
    except SimError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


def simulate(config: SimConfig, actor_log_level: str) -> int:
    try:
        import ray
    except ImportError:
        raise SimError("Ray is not installed: pip install 'fedmeta[ray]'") from None
    run, parameters = probe(config)
    print(f"run {run.run_id}: {run.algorithm} on {run.task}, {parameters:,} meta-parameters", flush=True)
    if config.ray_address == "local":
        ray.init(namespace="fedmeta-sim", include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=config.ray_address, namespace="fedmeta-sim", logging_level=logging.WARNING)
    try:
        try:
            actors = actor_count(config, ray.cluster_resources())
        except ValueError as exc:
            raise SimError(str(exc)) from None
        plan = split(virtual_clients(config), actors)
        computing = concurrency(config, actors)
        est: Estimate = estimate(run.algorithm, parameters, run.inner_steps, hosted=len(plan[0]), computing=computing)
        memory = config.memory_per_actor_mb * MIB or est.total_bytes
        print(f"memory estimate: {est.describe()}"
              + (f"; --memory-per-actor-mb {config.memory_per_actor_mb} used instead" if config.memory_per_actor_mb
                 else ""), flush=True)
        print(f"placing {actors} actors x ({config.cpus_per_actor:g} CPU, {config.gpus_per_actor:g} GPU, "
              f"{memory / MIB:.0f} MiB), {computing} computing at once each, over "
              f"{len([n for n in ray.nodes() if n.get('Alive')])} nodes", flush=True)
        settings = HostSettings(server=config.server, device="cuda" if config.gpus_per_actor > 0 else "cpu",
                                threads=max(1, int(config.cpus_per_actor)), computing=computing,
                                give_up_s=config.give_up_s, tls_ca=config.tls_ca, log_level=actor_log_level)
        driver = Driver(ray, config, settings, plan, memory)
        signal.signal(signal.SIGTERM, _on_signal)
        try:
            driver.start(list(range(actors)))
            code, why = driver.watch()
        except Shutdown as exc:
            code, why = 0, None
            log.info("%s received; stopping the virtual clients", exc)
        driver.stop()
        report = summarize(config, driver.events(), driver.placements, driver.incarnation, driver.lost)
        print(report.text(), flush=True)
        if config.report is not None:
            Path(config.report).write_text(json.dumps(report.as_json(), indent=1))
        if why is not None:
            raise SimError(why)
        return code
    finally:
        ray.shutdown()


if __name__ == "__main__":  # by its installed name, so Ray pickles RayHost by reference, not from __main__
    from fedmeta.client.sim import main as _main

    sys.exit(_main())
