"""Users -> client partitions, deterministic by seed.

cross-device: one client per user (partition p holds user p). cross-silo: N clients,
users shuffled with the seed and dealt into N groups of near-equal size.
"""

from __future__ import annotations

import functools

import numpy as np

from fedrec.errors import ConfigError


def num_partitions(mode: str, n_users: int, num_clients: int) -> int:
    """How many clients the partitioning makes."""
    if mode == "cross-device":
        return n_users
    if num_clients < 1:
        raise ConfigError("config key 'num-clients': cross-silo needs an integer >= 1")
    if num_clients > n_users:
        raise ConfigError(f"config key 'num-clients': {num_clients} clients for only "
                          f"{n_users} users; expected at most {n_users}")
    return num_clients


@functools.lru_cache(maxsize=8)
def partition_users(mode: str, n_users: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """User ids of every partition; disjoint, covering all users, reproducible.

    >>> [p.tolist() for p in partition_users("cross-silo", 5, 2, seed=0)]
    [[2, 3, 4], [0, 1]]
    """
    n = num_partitions(mode, n_users, num_clients)
    if mode == "cross-device":
        return [np.array([u]) for u in range(n_users)]
    perm = np.random.default_rng(seed).permutation(n_users)
    return [np.sort(part) for part in np.array_split(perm, n)]
