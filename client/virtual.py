"""Many virtual clients in one process: a host (a Ray actor in client/sim.py) and the ledger.

Each virtual client is an ordinary client/worker.py Worker with its own id, data seed and shard,
on its own thread, talking to the real coordinator over gRPC: it joins, long-polls, fetches,
computes and submits exactly like `fedmeta-client` (every check on what the coordinator sends is
the worker's own). A waiting client holds a thread blocked in a long-poll and nothing else; the
host's compute slots (a semaphore) bound how many compute at once, so memory is sized by the
slots, not the hosted clients. Channels to one coordinator share gRPC's subchannel pool: one
connection per process, whatever the number of clients.

The ledger records every update as it is sent ("submit") and as the coordinator answers
("answer": accepted, duplicate), on a separate actor, before the client goes on: what a client
saw accepted survives its host being killed, and an update sent but not answered before a kill
is "in doubt" (the coordinator may have counted it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedmeta.client.config import ClientConfig
from fedmeta.client.retry import CoordinatorUnreachable, RetryPolicy
from fedmeta.client.sim_plan import VirtualClient
from fedmeta.client.worker import ClientError, Worker, WorkerHooks
from fedmeta.common.proto import pb

log = logging.getLogger("fedmeta.sim")
Record = Callable[[dict[str, Any]], None]


def update_kind(header: pb.UpdateHeader) -> str:
    if header.kind != pb.UPDATE_KIND_EVALUATION:
        return "train"
    return "validation" if header.validation else "evaluation"


class Ledger:
    """Every update the virtual clients sent and what the coordinator answered, in arrival order."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)

    def events(self, start: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return self._events[start:]


@dataclass(frozen=True)
class HostSettings:
    """What every virtual client of a host shares (the rest of its ClientConfig is its own)."""

    server: str
    device: str = "cpu"
    threads: int = 1
    computing: int = 1
    give_up_s: float = 300.0
    tls_ca: str | None = None
    log_level: str = "error"


def configure_actor_logging(level: str) -> None:
    """An actor process's log level (the process is the actor's own: Ray starts it for the host)."""
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fedmeta").setLevel(getattr(logging, level.upper()))


class VirtualClientHost:
    """Runs its virtual clients on threads until each finishes, fails, or stop() is called."""

    def __init__(self, clients: list[VirtualClient], settings: HostSettings, *, record: Record | None = None,
                 actor: int = 0, incarnation: int = 0, node: str = "") -> None:
        self.clients = clients
        self.settings = settings
        self.actor, self.incarnation, self.node = actor, incarnation, node
        self._record = record
        self._slots = threading.BoundedSemaphore(settings.computing)
        self._lock = threading.Lock()
        self._workers: dict[str, Worker] = {}
        self._threads: list[threading.Thread] = []
        self.finished: set[str] = set()
        self.failed: dict[str, str] = {}
        self.computing = 0
        self.peak_computing = 0
        if settings.threads > 0:
            import torch

            torch.set_num_threads(settings.threads)

    # ---- what each worker gets --------------------------------------------------------------
    def _slot(self) -> _Slot:
        return _Slot(self)

    def _event(self, header: pb.UpdateHeader, phase: str, reply: pb.SubmitUpdateResponse | None) -> None:
        if self._record is None:
            return
        event = {"client": header.client_id, "round": int(header.round), "kind": update_kind(header),
                 "phase": phase, "node": self.node, "actor": self.actor, "incarnation": self.incarnation}
        if phase == "answer":
            event |= {"accepted": bool(reply is not None and reply.accepted),
                      "duplicate": bool(reply is not None and reply.duplicate)}
        try:
            self._record(event)
        except Exception as exc:  # the ledger is the driver's bookkeeping: losing it never stops a client
            log.warning("could not record an update in the ledger: %s", exc)

    def _hooks(self) -> WorkerHooks:
        return WorkerHooks(compute_slot=self._slot, on_submit=lambda h: self._event(h, "submit", None),
                           on_answer=lambda h, r: self._event(h, "answer", r))

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start every virtual client's thread; where this host runs."""
        s = self.settings
        for vc in self.clients:
            config = ClientConfig(server=s.server, client_id=vc.client_id, data_seed=vc.data_seed, shard=vc.shard,
                                  device=s.device, threads=0, tls_ca=s.tls_ca,
                                  retry=RetryPolicy(give_up_s=s.give_up_s))
            worker = Worker(config, self._hooks())
            self._workers[vc.client_id] = worker
            thread = threading.Thread(target=self._run, args=(worker,), name=f"vc-{vc.client_id}", daemon=True)
            self._threads.append(thread)
        if self.clients:
            try:  # a failure here is the first client's own to report (its thread joins again)
                self._workers[self.clients[0].client_id].warm_up()
            except (CoordinatorUnreachable, ClientError, ValueError) as exc:
                log.warning("warm-up failed: %s", exc)
        for thread in self._threads:
            thread.start()
        return {"actor": self.actor, "incarnation": self.incarnation, "node": self.node, "pid": os.getpid(),
                "clients": len(self.clients)}

    def _run(self, worker: Worker) -> None:
        cid = worker.config.client_id
        try:
            worker.run_forever()
        except (CoordinatorUnreachable, ClientError, ValueError) as exc:
            with self._lock:
                self.failed[cid] = str(exc)
            return
        except Exception as exc:  # a bug, not the coordinator: still one line, and the other clients go on
            log.exception("virtual client %s crashed", cid)
            with self._lock:
                self.failed[cid] = f"{type(exc).__name__}: {exc}"
            return
        finally:
            worker.session.close()
        with self._lock:
            if not worker.stop.is_set():
                self.finished.add(cid)

    def status(self) -> dict[str, Any]:
        with self._lock:
            running = sum(t.is_alive() for t in self._threads)
            first_error = next(iter(self.failed.values()), None)
            return {"actor": self.actor, "running": running, "finished": len(self.finished),
                    "failed": len(self.failed), "first_error": first_error, "computing": self.computing,
                    "peak_computing": self.peak_computing,
                    "rounds_trained": sum(w.rounds_trained for w in self._workers.values())}

    def stop(self) -> None:
        """Ask every virtual client to stop after its current call (the run is over)."""
        for worker in self._workers.values():
            worker.stop.set()


class _Slot:
    """One of the host's compute slots, held while a virtual client computes."""

    def __init__(self, host: VirtualClientHost) -> None:
        self.host = host

    def __enter__(self) -> None:
        self.host._slots.acquire()
        with self.host._lock:
            self.host.computing += 1
            self.host.peak_computing = max(self.host.peak_computing, self.host.computing)

    def __exit__(self, *exc: object) -> None:
        with self.host._lock:
            self.host.computing -= 1
        self.host._slots.release()
