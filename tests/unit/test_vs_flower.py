"""benchmarks/vs_flower.py's pure pieces: the summary and ratios, the run order, finding Flower's interpreter.

None of this runs Flower (fedmeta's environment cannot hold flwr: protobuf < 7 against >= 7.35.1).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.vs_flower import GOAL_RSS_MB, FlowerMissing, compare, flower_python, schedule

ROOT = Path(__file__).resolve().parents[2]


def run(round_s: list[float], peak_rss_mb: float) -> dict[str, object]:
    return {"round_s": round_s, "peak_rss_mb": peak_rss_mb}


def test_compare_pools_rounds_without_each_runs_first_and_takes_the_peak_over_runs() -> None:
    fedmeta = [run([5.0, 0.5, 0.5, 0.7], 350.0), run([4.0, 0.4, 0.6, 0.5], 390.0)]
    flower = [run([9.0, 4.0, 4.0, 4.0], 2000.0), run([9.0, 3.0, 4.0, 5.0], 1800.0)]
    s = compare(fedmeta, flower)
    assert s["fedmeta"]["round_s_excl_round_0"]["n"] == 6
    assert s["fedmeta"]["round_s_excl_round_0"]["median"] == pytest.approx(0.5)
    assert s["fedmeta"]["round_s_median_per_run"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert s["flower"]["round_s_excl_round_0"]["median"] == pytest.approx(4.0)
    assert s["fedmeta"]["peak_rss_mb"] == 390.0 and s["flower"]["peak_rss_mb"] == 2000.0
    assert s["ratio_fedmeta_over_flower"]["round_s_median"] == pytest.approx(0.125)
    assert s["ratio_fedmeta_over_flower"]["peak_rss"] == pytest.approx(0.195)
    assert s["goal_met"] == {"round_s": True, "rss": True}


def test_goal_is_not_met_over_either_limit() -> None:
    flower = [run([9.0, 4.0, 4.0], 2000.0)]
    slow = compare([run([1.0, 0.61, 0.61], 100.0)], flower)
    assert slow["goal_met"] == {"round_s": False, "rss": True}
    big = compare([run([1.0, 0.1, 0.1], GOAL_RSS_MB + 1)], flower)
    assert big["goal_met"] == {"round_s": True, "rss": False}


def test_runs_alternate_and_repeats_must_be_positive() -> None:
    assert schedule(2) == ["fedmeta", "flower", "fedmeta", "flower"]
    with pytest.raises(ValueError, match="--repeats"):
        schedule(0)


def test_flower_interpreter_is_the_first_candidate_that_has_flwr(tmp_path: Path) -> None:
    fake = tmp_path / "python-with-flwr"
    fake.write_text("#!/bin/sh\necho '{\"flwr\": \"1.99.0\", \"protobuf\": \"6.0\"}'\n")
    fake.chmod(0o755)
    python, versions = flower_python(None, candidates=[str(tmp_path / "missing"), str(fake)])
    assert python == str(fake) and versions["flwr"] == "1.99.0"


def test_without_flwr_the_error_says_how_to_install_it(tmp_path: Path) -> None:
    without = tmp_path / "python-without-flwr"
    without.write_text("#!/bin/sh\necho 'ModuleNotFoundError: flwr' >&2\nexit 1\n")
    without.chmod(0o755)
    with pytest.raises(FlowerMissing, match="flwr is not installed") as e:
        flower_python(None, candidates=[str(without)])
    assert "benchmarks/requirements-flower.txt" in str(e.value) and "--flower-python" in str(e.value)
    with pytest.raises(FlowerMissing, match=f"--flower-python {without}"):
        flower_python(str(without))


def test_the_script_exits_2_with_one_line_when_flower_is_missing(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "benchmarks/vs_flower.py", "--flower-python", str(tmp_path / "none")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("vs_flower: --flower-python ") and len(out.stderr.strip().splitlines()) == 1
    assert "requirements-flower.txt" in out.stderr and not (ROOT / "benchmarks/results/none.json").exists()
