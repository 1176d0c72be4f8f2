"""A client process for big_model_round.py: the real Worker loop, but training returns theta unchanged.

train() fetches the parameters (Worker._fetch, its cache cleared first) and submits a zero PARAMETER_DELTA of the
same names and shapes (Worker._submit), so each round moves the whole model down and up;
evaluate() submits trivial metrics. The last stdout line is JSON with per-round timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from fedmeta.client.worker import ClientConfig, Worker
from fedmeta.common.metrics import placeholder_metrics
from fedmeta.common.proto import pb


class EchoWorker(Worker):
    def __init__(self, config: ClientConfig, *, flat: bool, cache: bool) -> None:
        super().__init__(config)
        self.flat = flat
        self.cache = cache
        self.timings: list[dict[str, float]] = []

    def _zeros(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.flat:
            return {k: torch.zeros_like(v) for k, v in params.items()}
        buf = torch.zeros(sum(v.numel() for v in params.values()))
        out, offset = {}, 0
        for k, v in params.items():
            out[k] = buf[offset : offset + v.numel()].view(v.shape)
            offset += v.numel()
        return out

    def train(self, round_index: int, version: str) -> None:
        run = self.run
        assert run is not None
        if not self.cache:
            # A zero delta leaves theta, hence its version, unchanged, and Worker._fetch would
            # skip the download; forget the cached copy so every round moves the model both ways.
            self._cached_version = ""
        t0 = time.perf_counter()
        params = self._fetch(version)
        t1 = time.perf_counter()
        zeros = self._zeros(params)
        header = pb.UpdateHeader(
            run_id=run.run_id, round=round_index, client_id=self.config.client_id, base_version=version,
            kind=pb.UPDATE_KIND_PARAMETER_DELTA, weight=1.0, metrics={"loss_pre": 0.0, "loss_post": 0.0},
        )
        t2 = time.perf_counter()
        self._submit(header, zeros)
        t3 = time.perf_counter()
        self.timings.append({"round": round_index, "fetch_s": t1 - t0, "zeros_s": t2 - t1, "submit_s": t3 - t2})

    def evaluate(self, round_index: int, version: str, *, validation: bool = False) -> None:
        run = self.run
        assert run is not None
        header = pb.UpdateHeader(
            run_id=run.run_id, round=round_index, client_id=self.config.client_id, base_version=version,
            kind=pb.UPDATE_KIND_EVALUATION, weight=1.0, metrics=placeholder_metrics(run, evaluation=True),
        )
        self._submit(header, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flat", action="store_true", help="submit views of one flat buffer (zero-copy encode)")
    parser.add_argument("--cache", action="store_true",
                        help="keep Worker's parameter cache (the unchanged version is then not fetched again)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    worker = EchoWorker(ClientConfig(server=args.server, client_id=args.client_id, data_seed=0,
                                     threads=args.threads), flat=args.flat, cache=args.cache)
    rc = worker.run_forever()
    print(json.dumps({"client_id": args.client_id, "timings": worker.timings}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
