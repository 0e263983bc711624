"""Recommendation models with a declared local/shared parameter split.

Local parameters are indexed by user (user embeddings and biases): they stay on the
client that owns the user. Shared parameters (item embeddings and biases, MLP weights)
are the only ones aggregated. Each model class names its local submodules once, in
``LOCAL_MODULES``; everything else is shared.

Every model maps ``users [B]`` and ``items [B, K]`` to scores ``[B, K]`` and looks up each
embedding table exactly once per forward (required by Opacus ghost clipping).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fedrec.config import ModelConfig


class Embedding(nn.Embedding):
    """An ``nn.Embedding`` whose per-example gradient norms fedrec computes exactly and
    cheaply (see ``fedrec.privacy``); otherwise identical to ``nn.Embedding``."""


class Linear(nn.Linear):
    """An ``nn.Linear`` whose per-example gradient norms fedrec computes with a cost-based
    choice of formula (see ``fedrec.privacy``); otherwise identical to ``nn.Linear``."""


class RecModel(nn.Module):
    """Base class: the local/shared split and scoring against all items."""

    LOCAL_MODULES: ClassVar[tuple[str, ...]] = ()
    n_users: int
    n_items: int

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, K]`` for ``users [B]`` against ``items [B, K]``."""
        raise NotImplementedError

    def local_keys(self) -> list[str]:
        """state_dict keys of per-user parameters (never leave the client)."""
        return [k for k in self.state_dict() if k.split(".")[0] in self.LOCAL_MODULES]

    def shared_keys(self) -> list[str]:
        """state_dict keys of shared parameters (aggregated), in a fixed order."""
        return [k for k in self.state_dict() if k.split(".")[0] not in self.LOCAL_MODULES]

    def item_keys(self) -> list[str]:
        """Shared keys of item-indexed tables (one row per item)."""
        tables = {name for name, m in self.named_modules() if isinstance(m, Embedding)}
        return [k for k in self.shared_keys() if k.rsplit(".", 1)[0] in tables]

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the shared parameters only."""
        state = self.state_dict()
        return {k: state[k].detach().clone() for k in self.shared_keys()}

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the local (per-user) parameters only."""
        state = self.state_dict()
        return {k: state[k].detach().clone() for k in self.local_keys()}

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Scores of ``users [U]`` against every item: ``[U, n_items]``."""
        device = next(self.parameters()).device
        all_items = torch.arange(self.n_items, device=device)
        out = []
        for start in range(0, len(users), chunk):
            u = users[start:start + chunk].to(device)
            out.append(self(u, all_items.expand(len(u), -1)))
        return torch.cat(out) if out else torch.empty(0, self.n_items)

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """Item representation used for similarity explanations: ``[n_items, d]``."""
        raise NotImplementedError


def _init(emb: nn.Embedding, std: float, gen: torch.Generator | None) -> nn.Embedding:
    with torch.no_grad():
        emb.weight.normal_(0.0, std, generator=gen)
    return emb


def _init_linear(model: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default linear initialisation, drawn from ``gen``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=gen)
                if m.bias is not None:
                    bound = 1 / m.in_features ** 0.5
                    m.bias.uniform_(-bound, bound, generator=gen)


class MF(RecModel):
    """Matrix factorization: ``<p_u, q_i> + b_u + b_i + offset``.

    ``offset`` is a fixed, data-independent constant (the middle of the rating scale for
    explicit data, 0 for implicit), so it costs no privacy.
    """

    LOCAL_MODULES = ("user_emb", "user_bias")

    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.1,
                 offset: float = 0.0, gen: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_users, self.n_items, self.offset = n_users, n_items, offset
        self.user_emb = _init(Embedding(n_users, dim), init_std, gen)
        self.user_bias = Embedding(n_users, 1)
        self.item_emb = _init(Embedding(n_items, dim), init_std, gen)
        self.item_bias = Embedding(n_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, K]``."""
        p = self.user_emb(users)  # [B, d]
        q = self.item_emb(items)  # [B, K, d]
        dot = (q * p.unsqueeze(1)).sum(-1)  # [B, K]
        return dot + self.user_bias(users) + self.item_bias(items).squeeze(-1) + self.offset

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Scores ``[U, n_items]`` via one matrix product."""
        device = self.item_emb.weight.device
        users = users.to(device)
        return (self.user_emb(users) @ self.item_emb.weight.T + self.user_bias(users)
                + self.item_bias.weight.T + self.offset)

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """Item factors ``[n_items, d]``."""
        return self.item_emb.weight.detach()


def _mlp(sizes: tuple[int, ...], in_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [Linear(in_dim, size), nn.ReLU()]
        in_dim = size
    return nn.Sequential(*layers)


class NeuMF(RecModel):
    """NeuMF (He et al., 2017): GMF and an MLP tower on separate embeddings, fused by a
    final linear layer."""

    LOCAL_MODULES = ("user_gmf", "user_mlp")

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...],
                 init_std: float = 0.1, offset: float = 0.0,
                 gen: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_users, self.n_items, self.offset = n_users, n_items, offset
        self.user_gmf = _init(Embedding(n_users, dim), init_std, gen)
        self.user_mlp = _init(Embedding(n_users, dim), init_std, gen)
        self.item_gmf = _init(Embedding(n_items, dim), init_std, gen)
        self.item_mlp = _init(Embedding(n_items, dim), init_std, gen)
        self.mlp = _mlp(hidden, 2 * dim)
        self.predict = Linear(dim + hidden[-1], 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, K]``."""
        k = items.shape[1]
        gmf = self.user_gmf(users).unsqueeze(1) * self.item_gmf(items)  # [B, K, d]
        u = self.user_mlp(users).unsqueeze(1).expand(-1, k, -1)  # [B, K, d]
        h = self.mlp(torch.cat([u, self.item_mlp(items)], dim=-1))  # [B, K, h]
        return self.predict(torch.cat([gmf, h], dim=-1)).squeeze(-1) + self.offset

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """GMF and MLP item embeddings side by side ``[n_items, 2d]``."""
        return torch.cat([self.item_gmf.weight, self.item_mlp.weight], dim=1).detach()


class EmbeddingMLP(RecModel):
    """Embedding + fully-connected scorer: ``MLP([p_u, q_i]) -> score``."""

    LOCAL_MODULES = ("user_emb",)

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...],
                 init_std: float = 0.1, offset: float = 0.0,
                 gen: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_users, self.n_items, self.offset = n_users, n_items, offset
        self.user_emb = _init(Embedding(n_users, dim), init_std, gen)
        self.item_emb = _init(Embedding(n_items, dim), init_std, gen)
        self.mlp = _mlp(hidden, 2 * dim)
        self.out = Linear(hidden[-1], 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, K]``."""
        k = items.shape[1]
        u = self.user_emb(users).unsqueeze(1).expand(-1, k, -1)  # [B, K, d]
        h = self.mlp(torch.cat([u, self.item_emb(items)], dim=-1))  # [B, K, h]
        return self.out(h).squeeze(-1) + self.offset

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """Item embeddings ``[n_items, d]``."""
        return self.item_emb.weight.detach()


def build_model(cfg: ModelConfig, n_users: int, n_items: int, *, offset: float = 0.0,
                seed: int = 0) -> RecModel:
    """Instantiate the configured model, initialised from its own generator seeded with
    ``seed`` (the global torch generator is neither used nor re-seeded).

    >>> m = build_model(ModelConfig(model="mf", dim=8), n_users=3, n_items=5)
    >>> m(torch.tensor([0, 2]), torch.tensor([[1, 4], [0, 3]])).shape
    torch.Size([2, 2])
    """
    if cfg.dim < 1:
        raise ValueError("dim 0 is 'auto': build the model from a RunConfig's resolved "
                         "model section")
    gen = torch.Generator().manual_seed(seed)
    model: RecModel
    # layer constructors draw PyTorch's default init from the global generator before
    # fedrec redraws it from ``gen``: fork it so the global stream is left as it was
    with torch.random.fork_rng(devices=[]):
        if cfg.model == "mf":
            model = MF(n_users, n_items, cfg.dim, cfg.init_std, offset, gen)
        elif cfg.model == "neumf":
            model = NeuMF(n_users, n_items, cfg.dim, cfg.hidden_sizes, cfg.init_std, offset,
                          gen)
        else:
            model = EmbeddingMLP(n_users, n_items, cfg.dim, cfg.hidden_sizes, cfg.init_std,
                                 offset, gen)
    _init_linear(model, gen)
    return model
