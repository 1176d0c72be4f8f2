"""fedmeta and Flower side by side, in one run: the same 11M-parameter exchange through each, alternating.

The exchange: an MLP 1-3300-3300-1 (10,903,201 float32 parameters, 43.6 MB) fetched and
returned unchanged by 4 client processes for --rounds rounds (8), all on 127.0.0.1.

- fedmeta: big_model_round.one_run (benchmarks/_big_coordinator.py, Reptile, 4
  _echo_client.py processes that submit a zero delta; --max-concurrent-uploads 2, the default).
- Flower: benchmarks/_flower_server.py (flwr.server.start_server, Flower's gRPC transport,
  FedAvg with fraction_fit=1, min_fit_clients = min_available_clients = 4, no evaluation,
  initial parameters = the same shapes) and 4 benchmarks/_flower_client.py processes
  (flwr.client.start_client, a NumPyClient whose fit returns its parameters unchanged);
  grpc_max_message_length 512 MiB on both sides.

The runs alternate (fedmeta, flower, fedmeta, flower for --repeats 2) so that machine drift
hits both alike. Round time: median over every round but the first of every run of that
system (fedmeta: round_s from metrics.jsonl; Flower: configure_fit to the end of
aggregate_fit). Peak RSS of the server process only: psutil polled every --poll-ms, and
ru_maxrss of that child from os.wait4; the larger, max over runs. Ratios are fedmeta / Flower.

Goal for fedmeta on 2 cores: <= 0.6 s per round and <= 400 MB.

Flower 1.x pins protobuf < 7 and fedmeta needs protobuf >= 7.35.1, so the two cannot share one
environment: the Flower processes run under another interpreter (--flower-python; default
.venv-flower/bin/python), made once with

    python -m venv .venv-flower && .venv-flower/bin/pip install -r benchmarks/requirements-flower.txt
    python benchmarks/vs_flower.py                      # --repeats 2 --rounds 8
    python benchmarks/vs_flower.py --repeats 1          # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, Children, CpuMonitor, machine, summary_stats, wait_quiet, write_result  # noqa: E402
from benchmarks.big_model_round import RssPoller, one_run, reap, run_settings  # noqa: E402

NAME = "vs_flower"
GOAL_ROUND_S = 0.6
GOAL_RSS_MB = 400.0
MB = 1e6
HERE = Path(__file__).resolve().parent
FLOWER_VENV_PYTHON = ROOT / ".venv-flower" / "bin" / "python"
SETUP = ("python -m venv .venv-flower && .venv-flower/bin/pip install -r benchmarks/requirements-flower.txt "
         "(Flower 1.x needs protobuf<7, fedmeta protobuf>=7.35.1: they cannot share one venv)")
# Flower's children: no telemetry, and none of fedmeta's tree on their path.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": ""}
_PROBE = ("import json, flwr, grpc, google.protobuf, numpy, psutil; print(json.dumps({'flwr': flwr.__version__, "
          "'grpcio': grpc.__version__, 'protobuf': google.protobuf.__version__, 'numpy': numpy.__version__}))")


class FlowerMissing(RuntimeError):
    """No interpreter with flwr (and psutil) was found; the message says how to make one."""


def probe(python: str) -> dict[str, str] | None:
    """Versions of flwr, grpcio, protobuf, numpy under that interpreter, or None if it has no flwr."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, **FLOWER_ENV))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        versions = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return versions if isinstance(versions, dict) else None


def flower_python(explicit: str | None, candidates: list[str] | None = None) -> tuple[str, dict[str, str]]:
    """The interpreter the Flower processes run under, and its versions.

    explicit (--flower-python) must have flwr; otherwise the first of candidates that has it
    (default: $FEDMETA_FLOWER_PYTHON, .venv-flower/bin/python, this interpreter).
    """
    if explicit is not None:
        versions = probe(explicit)
        if versions is None:
            raise FlowerMissing(f"--flower-python {explicit}: cannot import flwr and psutil there; make one with: {SETUP}")
        return explicit, versions
    if candidates is None:
        candidates = [p for p in (os.environ.get("FEDMETA_FLOWER_PYTHON"), str(FLOWER_VENV_PYTHON), sys.executable) if p]
    for python in candidates:
        versions = probe(python)
        if versions is not None:
            return python, versions
    raise FlowerMissing(f"flwr is not installed (tried {', '.join(candidates)}): {SETUP}, or pass --flower-python")


def schedule(repeats: int) -> list[str]:
    """The order of the runs: fedmeta, flower, fedmeta, flower, ..."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    return ["fedmeta", "flower"] * repeats


def free_port() -> int:
    """A port free on 127.0.0.1 now (start_server does not report the port it bound, so we choose it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _last_json(lines: list[str]) -> dict[str, Any]:
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in the child's output")


def flower_run(args: argparse.Namespace, python: str) -> dict[str, Any]:
    """One Flower run: server + 4 clients, the server reaped with os.wait4, its RSS polled meanwhile."""
    children = Children()
    mib = str(args.max_message_mb)
    try:
        port = free_port()
        server = children.start([str(HERE / "_flower_server.py"), "--port", str(port), "--rounds", str(args.rounds),
                                 "--hidden", str(args.hidden), "--clients", "4", "--max-message-mb", mib],
                                python=python, env=FLOWER_ENV)
        poller = RssPoller(server.pid, args.poll_ms / 1e3)
        server.wait_listening()
        clients = [children.start([str(HERE / "_flower_client.py"), "--server", f"127.0.0.1:{port}",
                                   "--max-message-mb", mib], python=python, env=FLOWER_ENV) for _ in range(4)]
        reaped = reap(server, args.timeout_s)
        poller.stop()
        for c in clients:
            c.wait(60)
        if reaped["returncode"] != 0:
            raise RuntimeError(f"Flower server exited {reaped['returncode']}:\n{server.output()[-4000:]}")
        for t in server._threads:
            t.join(timeout=5)
        own = _last_json(server.lines)
        fits = [_last_json(c.lines)["fits"] for c in clients]
    finally:
        children.kill_all()
    round_s = [r["round_s"] for r in own["rounds"]]
    peak = max(poller.peak / MB, reaped["ru_maxrss_mb"])
    return {
        "parameters": own["parameters"],
        "payload_mb": own["payload_bytes"] / MB,
        "round_s": round_s,
        "round_0_s": round_s[0],
        "round_0_waiting_for_clients_s": own["rounds"][0]["sample_wait_s"],
        "round_s_excl_round_0": summary_stats(round_s[1:]),
        "rounds_measured": len(round_s) - 1,
        "failures": sum(r["failures"] for r in own["rounds"]),
        "client_fits": fits,
        "server_wall_s": own["wall_s"],
        "peak_rss_mb": peak,
        "peak_rss_polled_mb": poller.peak / MB,
        "peak_rss_wait4_ru_maxrss_mb": reaped["ru_maxrss_mb"],
        "ru_maxrss_self_reported_mb": own["ru_maxrss_self_mb"],
        "rss_start_mb": own["rss_start_mb"],
        "rss_after_import_mb": own["rss_after_import_mb"],
        "rss_before_rounds_mb": own["rss_before_rounds_mb"],
        "rss_at_end_mb": own["rss_at_end_mb"],
        "rss_samples": poller.samples,
        "rss_timeline_mb": poller.timeline,
        "server_cpu_s": reaped["cpu_s"],
    }


def side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's runs summarised: rounds pooled over runs, each run's first round excluded; peak RSS max over runs."""
    rounds = [s for r in runs for s in r["round_s"][1:]]
    return {"runs": len(runs), "round_s_excl_round_0": summary_stats(rounds),
            "round_s_median_per_run": [summary_stats(r["round_s"][1:]).get("median") for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_rss_mb_per_run": [r["peak_rss_mb"] for r in runs]}


def compare(fedmeta: list[dict[str, Any]], flower: list[dict[str, Any]]) -> dict[str, Any]:
    """Both sides, the ratios fedmeta / Flower (median round, peak RSS), and fedmeta's goal check."""
    f, w = side(fedmeta), side(flower)
    f_round, w_round = f["round_s_excl_round_0"]["median"], w["round_s_excl_round_0"]["median"]
    return {
        "fedmeta": f,
        "flower": w,
        "ratio_fedmeta_over_flower": {"round_s_median": f_round / w_round, "peak_rss": f["peak_rss_mb"] / w["peak_rss_mb"]},
        "goal_met": {"round_s": f_round <= GOAL_ROUND_S, "rss": f["peak_rss_mb"] <= GOAL_RSS_MB},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (fedmeta, flower) (default: 2)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per run, the first one excluded (default: 8)")
    parser.add_argument("--hidden", type=int, default=3300, help="MLP width H of 1-H-H-1 (default: 3300 -> 10.9M parameters)")
    parser.add_argument("--flower-python", default=None,
                        help="interpreter with flwr for the Flower processes (default: $FEDMETA_FLOWER_PYTHON, "
                             ".venv-flower/bin/python, or this one if it has flwr)")
    parser.add_argument("--max-message-mb", type=int, default=512, help="Flower's grpc_max_message_length in MiB (default: 512)")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="RSS polling interval (default: 20 ms)")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="limit per run (default: 240)")
    parser.add_argument("--quiet-timeout-s", type=float, default=60.0, help="longest wait for an idle machine (default: 60)")
    parser.add_argument("--no-wait-quiet", action="store_true", help="do not wait for an idle machine first")
    parser.add_argument("--name", default=NAME, help=f"results file benchmarks/results/NAME.json (default: {NAME})")
    return parser


def _line(system: str, r: dict[str, Any]) -> str:
    s = r["round_s_excl_round_0"]
    return (f"  {system}: round_s median {s['median']:.3f} s (max {s['max']:.3f}, n={s['n']}, round 0 "
            f"{r['round_0_s']:.2f} s); server peak RSS {r['peak_rss_mb']:.0f} MB (polled {r['peak_rss_polled_mb']:.0f}, "
            f"ru_maxrss {r['peak_rss_wait4_ru_maxrss_mb']:.0f}, after import {r['rss_after_import_mb']:.0f})")


def main() -> int:
    args = build_parser().parse_args()
    try:
        order = schedule(args.repeats)
        python, flower_versions = flower_python(args.flower_python)
    except (FlowerMissing, ValueError) as e:
        print(f"vs_flower: {e}", file=sys.stderr)
        return 2
    info = machine()
    quiet = None if args.no_wait_quiet else wait_quiet(timeout_s=args.quiet_timeout_s)
    monitor = CpuMonitor()
    fedmeta_args = run_settings(rounds=args.rounds, hidden=args.hidden, poll_ms=args.poll_ms, timeout_s=args.timeout_s)
    payload_mb = 4 * (args.hidden**2 + 4 * args.hidden + 1) / MB  # MLP 1-H-H-1, float32
    tmp = Path(tempfile.mkdtemp(prefix="fedmeta-vs-flower-"))
    runs: list[dict[str, Any]] = []
    try:
        for i, system in enumerate(order):
            print(f"run {i + 1}/{len(order)}: {system}, {args.rounds} rounds of 4 clients x ({payload_mb:.1f} MB down + up) ...",
                  flush=True)
            if system == "fedmeta":
                r = one_run(2, fedmeta_args, tmp / f"run{i}")
            else:
                r = flower_run(args, python)
            runs.append({"system": system, "index": i, **r})
            print(_line(system, r), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = compare([r for r in runs if r["system"] == "fedmeta"], [r for r in runs if r["system"] == "flower"])
    result = {
        "settings": {"repeats": args.repeats, "order": order, "rounds": args.rounds, "hidden": args.hidden,
                     "clients": 4, "poll_ms": args.poll_ms,
                     "fedmeta": {"algorithm": "reptile", "max_concurrent_uploads": 2, "encoding": "float32",
                                 "checkpoint_every": "never (final round only)"},
                     "flower": {"python": python, **flower_versions,
                                "api": "flwr.server.start_server + flwr.client.start_client (gRPC-bidi)",
                                "strategy": "FedAvg(fraction_fit=1, fraction_evaluate=0, min_fit_clients=4, "
                                            "min_available_clients=4, inplace=True)",
                                "grpc_max_message_length_mib": args.max_message_mb}},
        "goal": {"fedmeta_round_s_max": GOAL_ROUND_S, "fedmeta_peak_rss_mb_max": GOAL_RSS_MB},
        "summary": summary,
        "runs": runs,
        "cpu": monitor.stop(),
        "quiet_check": quiet,
        "machine": info,
    }
    path = write_result(args.name, result)
    f, w, ratio = summary["fedmeta"], summary["flower"], summary["ratio_fedmeta_over_flower"]
    print(f"fedmeta: median round {f['round_s_excl_round_0']['median']:.3f} s, peak RSS {f['peak_rss_mb']:.0f} MB; "
          f"Flower {flower_versions['flwr']}: {w['round_s_excl_round_0']['median']:.3f} s, {w['peak_rss_mb']:.0f} MB; "
          f"fedmeta/Flower: round {ratio['round_s_median']:.2f}, RSS {ratio['peak_rss']:.2f}")
    cpu = result["cpu"]
    print(f"goal (fedmeta) <= {GOAL_ROUND_S} s per round: {summary['goal_met']['round_s']}, <= {GOAL_RSS_MB:.0f} MB: "
          f"{summary['goal_met']['rss']}; other processes used {cpu['foreign_cpu_s']:.1f} CPU-s "
          f"({100 * cpu['foreign_share_of_capacity']:.0f}% of capacity); results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
