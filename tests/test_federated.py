"""Client logic without Flower: evaluation equivalence, accounting, state files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.central import run_centralized
from fedrec.config import MODELS, RunConfig
from fedrec.data import load_split
from fedrec.errors import StateError
from fedrec.evaluate import evaluate_counts
from fedrec.federated import (
    evaluate_client,
    fit_client,
    init_shared,
    initial_local,
    split_for_users,
)
from fedrec.metrics import finalize, merge_counts
from fedrec.model import build_model
from fedrec.partition import partition_users
from fedrec.state import (
    ClientState,
    ledger_path,
    load_ledger,
    load_state,
    save_ledger,
    save_state,
    state_path,
)

FLAT = {"synthetic-users": 40, "synthetic-items": 60, "dim": 4, "batch-size": 16,
        "negatives": 2, "rounds": 3, "num-clients": 4, "epochs": 2, "eval-every": 0}


@pytest.mark.parametrize("model", MODELS)
def test_initial_local_is_the_built_models_user_tables(model: str) -> None:
    """The user tables drawn without a model are the very ones a model built from the
    same seed holds (fit_client builds the model; the batched engine draws them)."""
    cfg = RunConfig.from_flat({"model": model, "dim": 8, "mlp-layers": "16,8"})
    for n_users, seed in ((1, 0), (3, 17)):
        built = build_model(cfg.model, n_users, 5, seed=seed).local_state_dict()
        drawn = initial_local(cfg, n_users, seed)
        assert set(drawn) == set(built)
        for key in built:
            assert torch.equal(drawn[key], built[key]), (model, key)


def test_federated_evaluation_equals_centralized() -> None:
    cfg = RunConfig.from_flat({**FLAT, "dp": False})
    split = load_split(cfg.data)
    model, _, _ = run_centralized(cfg, split)
    ks = cfg.eval.ks
    central = finalize(evaluate_counts(model, split.train, split.test, ks=ks, implicit=True), ks)
    shared = {k: v.numpy() for k, v in model.shared_state_dict().items()}
    parts = []
    for users in partition_users("cross-silo", split.n_users, 4, seed=0):
        data = split_for_users(split, users)
        local = {k: v[torch.from_numpy(users)] for k, v in model.local_state_dict().items()}
        state = ClientState(local=local, user_ids=data.user_ids)
        parts.append(evaluate_client(cfg, data, shared, state, seed=0))
    federated = finalize(merge_counts(parts), ks)
    assert federated == pytest.approx(central, rel=1e-12, abs=1e-12)


def _client(cfg: RunConfig, pid: int = 0):
    split = load_split(cfg.data)
    users = partition_users("cross-silo", split.n_users, cfg.fed.num_clients, 0)[pid]
    return split_for_users(split, users), init_shared(cfg, split.n_items)


def test_epsilon_grows_and_survives_a_restart(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({**FLAT, "dp": True, "target-epsilon": 3.0})
    data, shared = _client(cfg)
    path, lpath = state_path(tmp_path, 0), ledger_path(tmp_path, 0)
    eps = []
    for rnd in (1, 2):
        res = fit_client(cfg, data, shared, load_state(path), load_ledger(lpath), seed=0,
                         server_round=rnd)
        save_state(path, res.state)
        save_ledger(lpath, res.ledger)
        eps.append(res.epsilon)
        shared = res.shared
    # a "restart": nothing in memory, everything from the state files
    restored, ledger = load_state(path), load_ledger(lpath)
    assert restored.rounds == 2 and ledger.epsilon == pytest.approx(eps[-1])
    emb_before = restored.local["user_emb.weight"].clone()
    res = fit_client(cfg, data, shared, restored, ledger, seed=0, server_round=3)
    eps.append(res.epsilon)
    assert 0 < eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(3.0, abs=0.1)  # target reached after the planned rounds
    assert not torch.equal(res.state.local["user_emb.weight"], emb_before)


def test_budget_cap_stops_training(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({**FLAT, "dp": True, "target-epsilon": 3.0, "epsilon-cap": 2.8})
    data, shared = _client(cfg)
    state, ledger = None, None
    outcomes = []
    for rnd in (1, 2, 3, 4):  # the server asks for one round more than planned
        res = fit_client(cfg, data, shared, state, ledger, seed=0, server_round=rnd)
        outcomes.append(res.exhausted)
        state, ledger = res.state, res.ledger
        assert res.epsilon <= 2.8 + 1e-9
    assert outcomes == [False, False, True, True]  # round 3 would cross the cap of 2.8
    assert res.shared is None and res.num_examples == 0


def test_non_dp_touched_mask_covers_positives() -> None:
    cfg = RunConfig.from_flat({**FLAT, "dp": False})
    data, shared = _client(cfg)
    res = fit_client(cfg, data, shared, None, seed=0, server_round=1)
    assert res.touched is not None and res.touched[np.unique(data.train.items)].all()
    dp = fit_client(RunConfig.from_flat({**FLAT, "dp": True}), data, shared, None, seed=0,
                    server_round=1)
    assert dp.touched is None  # never sent with DP


def test_state_file_errors_are_clear(tmp_path: Path) -> None:
    path = state_path(tmp_path, 3)
    assert load_state(path) is None
    path.write_bytes(b"not a torch file")
    with pytest.raises(StateError, match="client-3.pt: corrupted client state.*ledger is a "
                       "separate file and is kept"):
        load_state(path)
    torch.save({"format": "something-else"}, path)
    with pytest.raises(StateError, match="not a fedrec client state"):
        load_state(path)
    save_state(path, ClientState(user_ids=["a"]))
    cfg = RunConfig.from_flat({**FLAT, "dp": False})
    data, shared = _client(cfg)
    state = load_state(path)
    state.local = {"user_emb.weight": torch.zeros(1, 4)}
    with pytest.raises(StateError, match="holds users"):
        fit_client(cfg, data, shared, state, seed=0, server_round=1, state_file=path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_recommend_finds_the_users_partition_and_explains_from_liked_items(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedrec.cli import main
    from fedrec.federated import partition_data
    from fedrec.recommend import liked_cut
    from fedrec.state import save_global

    cfg = RunConfig.from_flat({**FLAT, "dp": False, "num-clients": 3,
                               "state-dir": str(tmp_path)})
    shared = init_shared(cfg, load_split(cfg.data).n_items)
    for pid in range(3):
        data = partition_data(cfg, pid, 3)
        res = fit_client(cfg, data, shared, None, seed=pid, server_round=1)
        save_state(state_path(tmp_path, pid), res.state)
        save_global(tmp_path / f"global-{pid}.pt", shared, cfg.to_flat())
    data = partition_data(cfg, 2, 3)
    user = data.user_ids[0]
    assert main(["recommend", "--user", user, "--state-dir", str(tmp_path), "-k", "3",
                 "--at", "1000000000"]) == 0
    out = capsys.readouterr().out
    assert f"top 3 for user {user}" in out
    liked = {data.train.titles[i] for i, r, u in zip(data.train.items, data.train.ratings,
                                                      data.train.users)
             if u == 0 and r >= liked_cut(data, cfg)}
    because = [line.split("because you liked ", 1)[1] for line in out.splitlines()
               if "because you liked" in line]
    assert because and all(t in liked for line in because for t in line.split(" and "))
    assert liked_cut(data, cfg) == 4.0  # synthetic ratings are 1-5: liked = 4 or 5


@pytest.mark.parametrize("shape", ["disjoint", "overlapping"])
def test_split_for_parts_equals_split_for_users(shape: str) -> None:
    """All parts at once (one sort) give each client the very data ``split_for_users``
    gives it: same rows in the same order, local ids, user ids and features."""
    from fedrec.federated import split_for_parts, split_for_users

    cfg = RunConfig.from_flat({**FLAT, "model": "deepfm"})
    split = load_split(cfg.data)
    rng = np.random.default_rng(0)
    users = rng.permutation(split.n_users)
    parts = [users[:1], users[1:7], users[7:8], np.array([], dtype=np.int64), users[8:-3]]
    if shape == "overlapping":  # a user in two parts: split part by part
        parts.append(users[5:9])
    got = split_for_parts(split, parts)
    assert len(got) == len(parts)
    for users_j, mine in zip(parts, got):
        want = split_for_users(split, users_j)
        assert mine.user_ids == want.user_ids and mine.offset == want.offset
        assert (mine.implicit, mine.rating_span) == (want.implicit, want.rating_span)
        for a, b in ((mine.train, want.train), (mine.test, want.test)):
            for name in ("users", "items", "ratings", "timestamps", "user_ids"):
                assert np.array_equal(getattr(a, name), getattr(b, name)), name
            assert a.user_features == b.user_features and a.n_items == b.n_items
    assert sum(len(c.train) for c in got[:5]) == int(np.isin(
        split.train.users, users[:-3]).sum())  # the users left out own no rows here
