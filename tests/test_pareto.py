"""benchmarks/pareto.py: the Pareto front of quality against optimizer-state memory."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pareto", ROOT / "benchmarks" / "pareto.py")
pareto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pareto)


def sweep_front(points, higher_is_better):
    """The front by a sweep: by state (ties: better quality first), keep a point when it beats
    the best quality seen so far at smaller or equal state, or ties a kept point exactly."""
    sign = 1 if higher_is_better else -1
    front, best = set(), None
    for p in sorted(points, key=lambda p: (p["state_mib"], -sign * p["mean"])):
        quality = sign * p["mean"]
        if best is None or quality > best[0] or (quality, p["state_mib"]) == best:
            front.add(p["method"])
            best = (quality, p["state_mib"])
    return front


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_the_front_is_what_a_sweep_finds(higher_is_better):
    rng = random.Random(0)
    for _ in range(200):
        points = [
            {"method": f"m{i}", "mean": rng.choice([1.0, 2.0, 3.0, rng.random()]),
             "state_mib": rng.choice([10.0, 20.0, rng.random() * 30])}
            for i in range(rng.randint(1, 7))
        ]  # fmt: skip
        beaten = pareto.dominated_by(points, higher_is_better)
        assert {m for m, by in beaten.items() if not by} == sweep_front(points, higher_is_better)


def test_the_finetune_table_and_plot_come_from_the_raw_file(tmp_path):
    raw = ROOT / "benchmarks" / "results" / "finetune_seeds.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--finetune", str(raw)]
        + ["--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    points, _, _ = pareto.points_from_finetune(raw)
    front = sweep_front(points, True)
    rows = [line for line in (tmp_path / "pareto_finetune_seeds.md").read_text().splitlines()]
    for p in points:
        row = next(line for line in rows if line.startswith(f"| {p['method']} |"))
        assert row.endswith("| yes |") == (p["method"] in front)
        assert f"| {p['state_mib']:.1f} |" in row
    assert (tmp_path / "pareto_finetune_seeds.png").read_bytes()[:4] == b"\x89PNG"
