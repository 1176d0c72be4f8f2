"""Omniglot end to end on a generated archive: real coordinator, real clients, Conv4, each core algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedmeta.common.algorithms import ALGORITHMS
from fedmeta.common.models import EMBEDDING
from tests.omniglot_fixtures import write_fake_omniglot

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def omniglot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    # 6 alphabets: 1 held out for evaluation (20%, at least one), 5 dealt to the clients' shards.
    write_fake_omniglot(root, alphabets={f"Alphabet_{i}": 3 for i in range(6)}, drawings=8, size=40)
    return root


@pytest.mark.parametrize(("algorithm", "flags"), [
    ("maml", ()), ("fomaml", ()), ("reptile", ()),
    ("matchingnet", ("--matching-fce",)), ("relationnet", ()),  # a Conv4 encoder and the algorithm's "meta.*" modules
], ids=["maml", "fomaml", "reptile", "matchingnet-fce", "relationnet"])
def test_omniglot_run_with_conv4(processes, tmp_path: Path, omniglot_dir: Path, algorithm: str,
                                 flags: tuple[str, ...]) -> None:
    adapts = ALGORITHMS[algorithm].adapts
    run_dir = tmp_path / "run"
    server = processes.server(run_dir, *flags, "--task", "omniglot", "--algorithm", algorithm, "--rounds", "2",
                              "--clients-per-round", "2", "--min-clients", "2", "--shards", "2",
                              "--ways", "3", "--shots", "1", "--queries", "2", "--tasks-per-client", "2",
                              "--eval-shots", "2", "--eval-queries", "3", "--eval-steps", "2",
                              "--eval-tasks-per-client", "4")
    clients = [processes.client(server.port, f"site-{i}", i, "--data-dir", str(omniglot_dir)) for i in range(2)]
    assert server.wait(240) == 0, server.output()
    for c in clients:
        assert c.wait(30) == 0, c.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["eval"]
    assert summary["rounds_completed"] == 2 and ev["tasks"] == 8 and ev["ways"] == 3
    assert ev["transductive_bn"] is False  # Conv4 normalises queries with the support set's statistics
    assert 0.0 <= ev["accuracy_pre"] <= 1.0 and 0.0 <= ev["accuracy_post"] <= 1.0
    assert len(ev.get("curve", [])) == (3 if adapts else 0) and sorted(ev["per_client"]) == ["site-0", "site-1"]
    model = json.loads((run_dir / "model" / "model.json").read_text())
    assert model["model"]["name"] == "conv4" and model["model"]["kwargs"]["ways"] == (3 if adapts else EMBEDDING)
    assert model["model"]["kwargs"]["norm"] == "support" and model["ways"] == {"train": 3, "eval": 3}
    # The metric algorithms' modules (FCE LSTMs, relation module) are exported with the encoder.
    extras = {k for k in load_file(str(run_dir / "model" / "model.safetensors")) if k.startswith("meta.")}
    prefix = {"matchingnet": "meta.fce.", "relationnet": "meta.relation."}.get(algorithm)
    assert (len(extras) > 0 and all(k.startswith(prefix) for k in extras)) if prefix else not extras, extras


def test_client_without_data_dir_gets_a_clear_error(processes, tmp_path: Path) -> None:
    server = processes.server(tmp_path / "run", "--task", "omniglot", "--rounds", "1", "--clients-per-round", "1")
    client = processes.client(server.port, "site-0", 0)
    assert client.wait(60) == 1
    assert "--data-dir" in client.output() and "images_background" in client.output()
