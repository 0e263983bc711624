"""Centralized runs end to end, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.central import run_centralized
from fedrec.cli import build_parser, main
from fedrec.config import RunConfig
from fedrec.data import load_split

SMALL = ["--no-dp", "--synthetic-users", "80", "--synthetic-items", "100", "--dim", "8",
         "--batch-size", "128", "--seed", "2"]


def test_mf_learns_beyond_random() -> None:
    cfg = RunConfig.from_flat({"synthetic-users": 150, "synthetic-items": 200, "dim": 16,
                               "epochs": 15, "batch-size": 256, "lr": 0.01, "eval-every": 0,
                               "init-std": 0.01, "dp": False})
    split = load_split(cfg.data)
    _, trained, _ = run_centralized(cfg, split)
    _, untrained, _ = run_centralized(cfg.replace(lr=1e-9, epochs=1), split)
    assert trained["recall@20"] > 1.5 * untrained["recall@20"]


def test_cli_centralized_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["centralized", *SMALL, "--epochs", "2", "--eval-every", "1", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "recall@20" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("recall@20", "ndcg@20", "precision@10", "hr@10"):
        assert 0 <= metrics[key] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["model"] == "mf"
    lines = (out / "epochs.csv").read_text().splitlines()
    assert len(lines) == 3 and "recall@20" in lines[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_explicit_dp_reports_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "dp"
    assert main(["centralized", *SMALL, "--epochs", "2", "--feedback", "explicit",
                 "--objective", "mse", "--dp", "--target-epsilon", "2", "--quiet",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["epsilon"] == pytest.approx(2.0, abs=0.1) and m["delta"] == 1e-5
    assert m["unit_of_privacy"].startswith("one rating")
    assert m["rmse"] > 0


def test_bad_input_is_one_line_no_traceback_and_no_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,rating,timestamp\n1,2,x,3\n")
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec", "centralized", "--dataset", "csv", "--data-file",
         str(bad), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}, line 2: rating field is 'x'; expected a number" in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_option_value_names_the_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["centralized", "--epochs", "zero"]) == 2
    assert "'epochs': expected an integer" in capsys.readouterr().err


def test_help_explains_every_option() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["centralized"].format_help()
    for action in build_parser()._subparsers._group_actions[0].choices[
            "centralized"]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    assert "--noise-multiplier" in text and "sigma" in text


def test_cli_refuses_abbreviations_and_unused_options_with_suggestions(
        capsys: pytest.CaptureFixture) -> None:
    from fedrec.cli import build_parser

    with pytest.raises(SystemExit):
        main(["simulate", "--epsilon", "4"])  # not --epsilon-cap by prefix
    err = capsys.readouterr().err
    assert "unrecognized arguments: --epsilon 4" in err and "--epsilon-cap" in err
    with pytest.raises(SystemExit):
        main(["simulate", "--epochs", "3"])  # federated runs use --local-epochs
    assert "did you mean --local-epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["centralized", "--user-dp"])  # federated-only privacy option
    capsys.readouterr()
    sim = build_parser()._subparsers._group_actions[0].choices["simulate"]  # type: ignore[union-attr]
    text = sim.format_help()
    assert "--fault-rate" not in text and "{synthetic,ml-100k" in text and " V " not in text
    assert sim.parse_args(["--fault-rate", "0.1"]).fault_rate == "0.1"  # hidden, accepted


def test_runs_are_reproducible_from_a_config_file_or_results_dir(tmp_path: Path) -> None:
    import json

    toml = tmp_path / "c.toml"
    toml.write_text("synthetic-users = 40\nsynthetic-items = 50\nepochs = 2\ndp = false\n")
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["centralized", "--config", str(toml), "--out", str(first), "--quiet",
                 "--threads", "1"]) == 0
    saved = json.loads((first / "config.json").read_text())
    assert saved["synthetic-users"] == 40 and saved["torch_version"] and "git_commit" in saved
    assert {"model.pt", "epochs.png", "metrics.json"} <= {p.name for p in first.iterdir()}
    # rerun from the results dir, changing one option
    assert main(["centralized", "--config", str(first), "--epochs", "1", "--out",
                 str(second), "--quiet"]) == 0
    again = json.loads((second / "config.json").read_text())
    assert again["synthetic-users"] == 40 and again["epochs"] == 1
    (tmp_path / "bad.toml").write_text("bogus = 1\n")
    assert main(["centralized", "--config", str(tmp_path / "bad.toml"), "--out",
                 str(tmp_path / "c")]) == 2


def test_early_stopping_chooses_the_epoch_on_validation_and_reports_it() -> None:
    from fedrec.central import run_centralized
    from fedrec.config import RunConfig
    from fedrec.data import load_split

    cfg = RunConfig.from_flat({"synthetic-users": 60, "synthetic-items": 80, "dim": 8,
                               "epochs": 30, "lr": 0.05, "dp": False, "early-stopping": 2})
    _, metrics, rows = run_centralized(cfg, load_split(cfg.data))
    val = [r["validation-recall@20"] for r in rows]
    assert metrics["best_epoch"] == 1 + val.index(max(val))
    assert metrics["epochs_run"] == len(rows) <= metrics["best_epoch"] + 2
    assert 0 <= metrics["recall@20"] <= 1 and all("recall@20" not in r for r in rows)
    with pytest.raises(Exception, match="early-stopping"):
        RunConfig.from_flat({"dp": True, "early-stopping": 3})
