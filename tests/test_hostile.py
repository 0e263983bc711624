"""Hostile input: random ratings files and config values give clear errors, never a crash."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.cli import main
from fedrec.config import RunConfig, flat_defaults
from fedrec.errors import ConfigError

GOOD = ["user,item,rating,timestamp", "1,10,4,100", "1,11,5,101", "2,10,3,102", "2,12,1,103"]
BAD_LINES = st.one_of(
    st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t),
    st.sampled_from(["1,10,-3,100", "1,10,nan,100", "1,10,inf,100", "x,y,z,w", "1;10;4;100",
                     "99999999999999999999999,1,4,1", "1,10", "1,10,4,100,extra", ",,,",
                     "1\t10\t4\t100"]),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(BAD_LINES, min_size=1, max_size=5), binary=st.binary(max_size=64),
       use_binary=st.booleans())
def test_garbage_ratings_files_give_one_line_errors(tmp_path: Path, lines: list[str],
                                                    binary: bytes, use_binary: bool,
                                                    capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "ratings.csv"
    if use_binary:
        path.write_bytes("\n".join(GOOD).encode() + b"\n" + binary)
    else:
        path.write_text("\n".join(GOOD[:2] + lines + GOOD[2:]) + "\n", encoding="utf-8")
    before = set(tmp_path.iterdir())
    code = main(["data", "info", "--dataset", "csv", "--data-file", str(path),
                 "--min-interactions", "1"])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("fedrec: error:") and "Traceback" not in err
        assert str(path) in err or "ratings" in err
    assert set(tmp_path.iterdir()) == before  # nothing half-written next to the data


VALUES = st.one_of(st.text(max_size=8), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(sorted(flat_defaults())), value=VALUES)
def test_any_config_value_is_accepted_or_named_in_a_config_error(key: str, value: object) -> None:
    try:
        cfg = RunConfig.from_flat({key: value})
    except ConfigError as err:
        assert key in str(err)
        return
    got = cfg.to_flat()[key]
    if isinstance(got, float):
        assert not math.isnan(got)


@given(key=st.text(min_size=1, max_size=12).filter(lambda k: k not in flat_defaults()))
def test_unknown_keys_are_named(key: str) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        RunConfig.from_flat({key: 1})
