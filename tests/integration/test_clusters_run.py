"""--clusters with --aggregator task-aware, end to end: a coordinator and four client processes on 127.0.0.1.

Two clients draw sinusoids of family a (phase in [0, pi/2]), two of family b (phase in
[pi, 3 pi/2]: minus an a task). After the split the families train different clusters, the
run exports one θ per cluster, and fedmeta-adapt assigns a new holder's support set to the
cluster its family trained, and says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedmeta.client import adapt

pytestmark = pytest.mark.integration


def _csv(path: Path, phase: float, n: int) -> Path:
    xs = [-5.0 + 10.0 * (i + 0.5) / n for i in range(n)]
    path.write_text("x,y\n" + "".join(f"{x:.6f},{4.0 * math.sin(x - phase):.6f}\n" for x in xs))
    return path


def test_two_families_train_two_clusters_and_adapt_picks_the_right_one(processes, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, "--rounds", "8", "--clients-per-round", "4", "--min-clients", "4",
                              "--clusters", "2", "--cluster-warmup", "2", "--aggregator", "task-aware",
                              "--eval-tasks-per-client", "5", "--round-deadline-s", "120")
    families = {"c0": "a", "c1": "a", "c2": "b", "c3": "b"}
    clients = [processes.client(server.port, cid, i, "--task-family", fam) for i, (cid, fam) in
               enumerate(families.items())]
    for c in clients:
        assert c.wait(300) == 0, c.output()[-3000:]
    assert server.wait(120) == 0, server.output()[-3000:]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["cluster_members"] == {cid: 0 for cid in families}  # joint before the split
    last = records[-1]
    split_round = last["cluster_split_round"]
    assert split_round is not None and split_round >= 2
    members = last["cluster_members"]
    assert members["c0"] == members["c1"] != members["c2"] == members["c3"], members
    assert "agreement_mean" in last[f"cluster_{members['c0']}"]  # task-aware inside each cluster

    model = run_dir / "model"
    assert json.loads((model / "model.json").read_text())["clusters"] == 2
    for j in (0, 1):
        assert json.loads((model / f"cluster-{j}" / "model.json").read_text())["cluster"] == {"index": j, "of": 2}
    for family, phase in (("a", math.pi / 4), ("b", 1.25 * math.pi)):
        out = tmp_path / f"adapt-{family}"
        support, query = _csv(tmp_path / f"s{family}.csv", phase, 10), _csv(tmp_path / f"q{family}.csv", phase, 7)
        # fedmeta-adapt's entry point, in this process (a second torch start-up would only cost time).
        assert adapt.main(["--model", str(model), "--support", str(support), "--query", str(query),
                           "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        chosen = json.loads((out / "adapt.json").read_text())["cluster"]
        expected = members["c0" if family == "a" else "c2"]
        assert chosen["index"] == expected, (family, chosen, members)
        assert f"cluster           {expected} of 2" in printed
