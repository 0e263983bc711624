"""fedrec privacy-sweep: points, resume, outputs (small synthetic data)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from fedrec.cli import main
from fedrec.errors import ConfigError
from simulations.sweep import parse_epsilons, plan

ARGS = ["--synthetic-users", "40", "--synthetic-items", "200", "--rounds", "2", "--dim", "4",
        "--negatives", "4",  # the attack test needs uploads that touch few rows
        "--partition", "cross-silo", "--num-clients", "2", "--min-clients", "2",
        "--attack-clients", "2", "--epsilons", "2,inf", "--seeds", "0",
        "--modes", "none,record,user,distributed", "--quiet", "--jobs", "1"]


def test_plan_and_epsilon_parsing() -> None:
    assert parse_epsilons("0.5, 1,inf") == [0.5, 1.0, math.inf]
    with pytest.raises(ConfigError, match="'x'"):
        parse_epsilons("1,x")
    with pytest.raises(ConfigError, match="> 0"):
        parse_epsilons("0")
    points = plan(["none", "record"], [1.0, math.inf], [0, 1])
    assert points == [("popularity", 1.0, 0), ("popularity", 1.0, 1),
                      ("popularity", math.inf, 0), ("popularity", math.inf, 1),
                      ("none", math.inf, 0), ("none", math.inf, 1), ("record", 1.0, 0),
                      ("record", 1.0, 1)]
    with pytest.raises(ConfigError, match="bogus"):
        plan(["bogus"], [1.0], [0])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_sweep_writes_table_plot_and_resumes(tmp_path: Path) -> None:
    """Two points side by side in worker processes (points.csv in the order they
    finish), then a resume in this process."""
    out = tmp_path / "sweep"
    assert main(["privacy-sweep", "--out", str(out), *ARGS[:-1], "2"]) == 0
    rows = _rows(out / "points.csv")
    assert sorted((r["mode"], r["target_epsilon"]) for r in rows) == sorted([
        ("popularity", "2.0"), ("popularity", "inf"), ("none", "inf"), ("record", "2.0"),
        ("user", "2.0"), ("distributed", "2.0")])
    by_mode = {r["mode"]: r for r in rows}
    assert float(by_mode["record"]["record_epsilon"]) == pytest.approx(2.0, rel=0.02)
    assert float(by_mode["user"]["user_epsilon"]) == pytest.approx(2.0, rel=0.02)
    assert float(by_mode["distributed"]["user_epsilon"]) == pytest.approx(2.0, rel=0.02)
    assert {r["engine"] for r in rows} == {"inprocess", "baseline"}
    assert all(0.0 <= float(r["attack_auc"]) <= 1.0 for r in rows if r["mode"] != "popularity")
    assert float(by_mode["none"]["attack_auc_bias"]) > 0.75  # an upload without DP leaks
    assert abs(float(by_mode["distributed"]["attack_auc"]) - 0.5) < 0.2  # masked vectors
    assert all(r["noise_secret"] == "True" for r in rows)
    assert {"recall@20", "ndcg@20", "hr@20", "precision@10"} <= set(rows[0])
    table = (out / "summary.md").read_text()
    assert "| record | 2 |" in table and "| none | ∞ |" in table
    assert "| popularity | 2 |" in table and "| distributed | 2 |" in table
    assert (out / "privacy_utility.png").read_bytes()[:4] == b"\x89PNG"

    # Interrupted sweep: drop the last finished point; a rerun runs only that one.
    kept = rows[:-1]
    with (out / "points.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    assert main(["privacy-sweep", "--out", str(out), *ARGS]) == 0
    again = _rows(out / "points.csv")
    assert again[:-1] == kept  # finished points untouched, not rerun
    assert again[-1]["mode"] == rows[-1]["mode"]


def test_a_sweep_dir_refuses_points_of_another_config(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [a if a != "2,inf" else "inf" for a in ARGS]
    args[args.index("none,record,user,distributed")] = "none"
    assert main(["privacy-sweep", "--out", str(out), *args]) == 0
    changed = [a if a != "4" else "8" for a in args]  # --dim 4 -> 8
    assert main(["privacy-sweep", "--out", str(out), *changed]) == 2
    assert len(_rows(out / "points.csv")) == 2  # popularity and none, nothing more


def test_keys_added_later_at_their_default_do_not_split_a_sweep(tmp_path: Path) -> None:
    import json

    from fedrec.config import RunConfig
    from simulations.sweep import _check_same_config

    path = tmp_path / "config.json"
    base = RunConfig.from_flat({"rounds": 3})
    _check_same_config(path, base)
    old = json.loads(path.read_text())
    del old["max-update-norm"]  # a sweep dir made before this key existed
    path.write_text(json.dumps(old))
    _check_same_config(path, base)  # same behaviour: accepted
    with pytest.raises(ConfigError, match="max-update-norm"):
        _check_same_config(path, RunConfig.from_flat({"rounds": 3, "max-update-norm": 5.0}))
