import pytest
import torch

from fedrec.config import ModelConfig
from fedrec.model import build_model

MODELS = ["mf", "neumf", "mlp", "deepfm", "widedeep"]


@pytest.mark.parametrize("name", MODELS)
def test_local_and_shared_are_disjoint_and_cover(name: str) -> None:
    m = build_model(ModelConfig(model=name, dim=4, mlp_layers="8,4"), n_users=7, n_items=11)
    local, shared = set(m.local_keys()), set(m.shared_keys())
    assert local and shared and not local & shared
    assert local | shared == set(m.state_dict())
    # every local tensor is indexed by user, no shared tensor is
    for k, v in m.state_dict().items():
        assert (v.shape[0] == 7) == (k in local), k
    assert set(m.shared_state_dict()) == shared and set(m.local_state_dict()) == local


def test_mf_parameter_count() -> None:
    u, i, d = 7, 11, 4
    m = build_model(ModelConfig(model="mf", dim=d), n_users=u, n_items=i)
    assert sum(p.numel() for p in m.parameters()) == (u + i) * (d + 1)


@pytest.mark.parametrize("name", MODELS)
def test_score_all_matches_forward(name: str) -> None:
    m = build_model(ModelConfig(model=name, dim=4, mlp_layers="8,4"), n_users=5, n_items=9)
    users = torch.tensor([0, 3, 4])
    full = m.score_all(users)
    assert full.shape == (3, 9)
    items = torch.arange(9).expand(3, -1)
    assert torch.allclose(full, m(users, items), atol=1e-5)
