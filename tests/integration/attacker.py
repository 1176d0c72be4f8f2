"""A client whose every update is its honest one times --scale: the poisoner of the robust-aggregation test.

    python -m tests.integration.attacker --server HOST:PORT --client-id evil --scale -1000
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from fedmeta.client.worker import ClientConfig, Worker
from fedmeta.common.algorithms import ClientUpdate
from fedmeta.common.config import RunConfig


class Attacker(Worker):
    def __init__(self, config: ClientConfig, scale: float) -> None:
        super().__init__(config)
        self.scale = scale

    def join(self) -> RunConfig:
        run = super().join()
        honest = self.algorithm

        def poisoned(*args: Any) -> ClientUpdate:
            update = honest.client_step(*args)
            return dataclasses.replace(update, tensors={k: v * self.scale for k, v in update.tensors.items()})

        self.algorithm = dataclasses.replace(honest, client_step=poisoned)
        return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--data-seed", type=int, default=99)
    parser.add_argument("--scale", type=float, required=True)
    args = parser.parse_args()
    config = ClientConfig(server=args.server, client_id=args.client_id, data_seed=args.data_seed, threads=1)
    return Attacker(config, args.scale).run_forever()


if __name__ == "__main__":
    sys.exit(main())
