"""benchmarks/fed_vs_central.py's in-process component timings: what a round costs besides the network.

Not a benchmark itself.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def component_timings(reps: int) -> dict[str, Any]:
    """Median cost, 1 thread, of what a round does besides the network (sinusoid MLP 1-40-40-1)."""
    import torch

    torch.set_num_threads(1)
    from fedmeta.common.aggregation import FlatLayout, WeightedMean
    from fedmeta.common.algorithms import InnerConfig, OuterConfig, get_algorithm
    from fedmeta.common.codec import Reassembler, decode, encode, iter_chunks
    from fedmeta.common.models import build_model, init_parameters
    from fedmeta.common.tasks import STREAM_TRAIN, loss_for, sample_batch, task_seed
    from fedmeta.server import checkpoint
    from fedmeta.server.config import build

    config = build({"local_clients": 4, "run_dir": "unused"})
    run = config.run
    algorithm = get_algorithm(run.algorithm)
    model = build_model(run.model)
    loss_fn = loss_for(run.task)
    params = init_parameters(run.model, run.seed)
    inner = InnerConfig(steps=run.inner_steps, lr=run.inner_lr)

    def timed(fn: Any, n: int) -> list[float]:
        out = []
        for i in range(n):
            t = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t)
        return out

    def batch(i: int) -> Any:
        return sample_batch(run.task, num_tasks=run.tasks_per_client, shots=run.shots, queries=run.queries,
                            seed=task_seed(run.seed, 0, STREAM_TRAIN, i))

    first = timed(lambda i: algorithm.client_step(model, params, batch(i), loss_fn, inner), 1)[0]
    step = timed(lambda i: algorithm.client_step(model, params, batch(i), loss_fn, inner), reps)
    sampling = timed(batch, reps)
    layout = FlatLayout.of(params)
    flat = layout.flatten(params)
    outer = algorithm.make_outer(OuterConfig(lr=config.outer_lr, rounds=config.rounds))
    update = algorithm.client_step(model, params, batch(0), loss_fn, inner)

    def aggregate(i: int) -> None:
        acc = WeightedMean(layout)
        for _ in range(4):
            acc.add(update.tensors, update.weight)
        theta = flat.clone()
        outer.step(theta, acc.mean(), i)
        encode(layout.views(theta))

    def wire(i: int) -> None:
        enc = encode(update.tensors)
        r = Reassembler(enc.header, max_bytes=1 << 30)
        for off, data in iter_chunks(enc.payload):
            r.add(off, data)
        decode(r.finish())

    with tempfile.TemporaryDirectory(prefix="fedmeta-ckpt-") as d:
        ckpt = checkpoint.Checkpoint(flat, outer.state_dict(), {"next_round": 1, "config": {"x": 1}})
        save = timed(lambda i: checkpoint.save(Path(d), ckpt), min(reps, 100))
    ms = lambda v: round(1e3 * statistics.median(v), 3)  # noqa: E731
    return {
        "threads": 1,
        "maml_client_step_first_call_ms": round(1e3 * first, 1),
        "maml_client_step_ms": ms(step),
        "maml_client_step_p90_ms": round(1e3 * statistics.quantiles(step, n=10)[-1], 3),
        "sample_batch_ms": ms(sampling),
        "aggregate_4_updates_outer_step_publish_ms": ms(timed(aggregate, reps)),
        "encode_chunk_reassemble_decode_update_ms": ms(timed(wire, reps)),
        "checkpoint_save_ms": ms(save),
        "parameters": layout.numel,
        "reps": reps,
    }
