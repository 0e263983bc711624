import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.errors import ConfigError
from fedrec.partition import num_partitions, partition_users


@settings(max_examples=60, deadline=None)
@given(n_users=st.integers(1, 300), n_clients=st.integers(1, 300), seed=st.integers(0, 10**6))
def test_cross_silo_partitions_are_disjoint_covering_reproducible(
        n_users: int, n_clients: int, seed: int) -> None:
    n_clients = min(n_clients, n_users)
    parts = partition_users("cross-silo", n_users, n_clients, seed)
    assert len(parts) == n_clients
    allu = np.concatenate(parts)
    assert sorted(allu.tolist()) == list(range(n_users))  # disjoint and covering
    again = partition_users("cross-silo", n_users, n_clients, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_cross_device_is_one_user_per_client() -> None:
    parts = partition_users("cross-device", 5, 0, seed=0)
    assert [p.tolist() for p in parts] == [[0], [1], [2], [3], [4]]


def test_too_many_clients_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num-clients"):
        num_partitions("cross-silo", 3, 4)
