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
    ("epochs", -1, "'epochs': expected an integer >= 1 \\(0: auto\\)"),
    ("negatives", -2, "'negatives': expected an integer >= 1 \\(0: auto\\)"),
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


def test_auto_keys_take_the_recipe_of_the_setting() -> None:
    """Each setting resolves 'auto' to its tuned recipe; explicit values win."""
    from fedrec.config import RECIPES

    cases = {
        "central": ({"dp": False}, True), "central-dp": ({"dp": True}, True),
        "cross-silo": ({"dp": False}, False), "cross-silo-dp": ({"dp": True}, False),
        "cross-device": ({"dp": False, "partition": "cross-device"}, False),
        "cross-device-dp": ({"dp": True, "partition": "cross-device"}, False),
    }
    for name, (flat, central) in cases.items():
        cfg = RunConfig.from_flat(flat, central=central)
        assert cfg.setting == name
        assert cfg.fed.local_epochs == RECIPES[name]["local-epochs"]
        assert cfg.train.lr == RECIPES[name]["lr"] and cfg.model.dim == RECIPES[name]["dim"]
        assert cfg.data.negatives == RECIPES[name]["negatives"]
        assert cfg.train.epochs == RECIPES[name]["epochs"]
    for extra in ({"user-dp": True}, {"ddp": True}):  # every DP mode on one-user clients
        cfg = RunConfig.from_flat({"dp": False, "partition": "cross-device", **extra})
        assert cfg.setting == "cross-device-dp" and cfg.fed.local_epochs == 1
    assert RunConfig.from_flat({"partition": "cross-device", "dp": False,
                                "local-epochs": 3}).fed.local_epochs == 3
    # a federated config's auto keys take the central recipe when trained centrally
    fed = RunConfig.from_flat({"dp": False})
    assert fed.for_central().data.negatives == RECIPES["central"]["negatives"]
    assert RunConfig.from_flat({"dp": False, "negatives": 2}).for_central().data.negatives == 2
