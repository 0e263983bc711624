import pytest

from fedrec.config import RunConfig, flat_defaults
from fedrec.errors import ConfigError


def test_defaults_round_trip() -> None:
    cfg = RunConfig()
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert flat_defaults()["noise-multiplier"] == 1.0


def test_unknown_key_is_named_with_valid_keys() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'noise-multiplyer'.*noise-multiplier"):
        RunConfig.from_flat({"noise-multiplyer": 1.0})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", "three", "'epochs': expected an integer"),
    ("epochs", 0, "'epochs': expected an integer >= 1"),
    ("lr", -1.0, "'lr': expected a number > 0"),
    ("dp", "maybe", "'dp': expected true or false"),
    ("model", "svd", "'model': expected one of"),
    ("top-k", "10,x", "'top-k'"),
    ("delta", 1.5, "'delta': expected a number in"),
    ("test-fraction", float("nan"), "'test-fraction': expected a number, got NaN"),
])
def test_bad_values_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat({key: value})


def test_strings_are_coerced() -> None:
    cfg = RunConfig.from_flat({"epochs": "3", "dp": "true", "lr": "0.1"})
    assert (cfg.train.epochs, cfg.privacy.dp, cfg.train.lr) == (3, True, 0.1)
