"""A Flower client process for vs_flower.py: a NumPyClient whose fit returns the parameters it was given.

Runs in an environment with flwr (benchmarks/requirements-flower.txt); it imports nothing from
fedmeta. `flwr.client.start_client` (gRPC-bidi, deprecated since 1.13 but still shipped in 1.x)
with grpc_max_message_length raised like the server's. Returns when the server ends the run;
the last stdout line is JSON with the time of each fit call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.client import NumPyClient, start_client  # noqa: E402


class EchoClient(NumPyClient):
    """fit: the parameters back unchanged, one example; no evaluation."""

    def __init__(self) -> None:
        self.fits: list[float] = []

    def get_parameters(self, config: dict[str, Any]) -> list[Any]:
        raise RuntimeError("the server sends initial parameters; get_parameters must not be called")

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict[str, Any]]:
        self.fits.append(time.time())
        return parameters, 1, {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--max-message-mb", type=int, default=512, help="grpc_max_message_length in MiB")
    args = parser.parse_args()
    client = EchoClient()
    start_client(server_address=args.server, client=client.to_client(), insecure=True,
                 grpc_max_message_length=args.max_message_mb << 20)
    print(json.dumps({"fits": len(client.fits), "fit_times": client.fits}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
