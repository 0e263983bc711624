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
from fedrec.features import (
    AGE_EDGES,
    AGE_ROW,
    CONTEXT_COLUMNS,
    CONTEXT_ROWS,
    ITEM_SLOTS,
    USER_SLOTS,
    Features,
)
from fedrec.text import TEXT_DIM


class Embedding(nn.Embedding):
    """An ``nn.Embedding`` whose per-example gradient norms fedrec computes exactly and
    cheaply (see ``fedrec.privacy``); otherwise identical to ``nn.Embedding``."""


class Linear(nn.Linear):
    """An ``nn.Linear`` whose per-example gradient norms fedrec computes with a cost-based
    choice of formula (see ``fedrec.privacy``); otherwise identical to ``nn.Linear``."""


class RecModel(nn.Module):
    """Base class: the local/shared split and scoring against all items."""

    LOCAL_MODULES: ClassVar[tuple[str, ...]] = ()
    ITEM_MODULES: ClassVar[tuple[str, ...]] = ()  # shared tables with one row per item
    # local tables that start at zero; the others are drawn N(0, init_std) from the
    # model's generator before anything else, in registration order (``initial_local``)
    LOCAL_ZEROS: ClassVar[tuple[str, ...]] = ()
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
        return [k for k in self.shared_keys() if k.split(".")[0] in self.ITEM_MODULES]

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
    ITEM_MODULES = ("item_emb", "item_bias")
    LOCAL_ZEROS = ("user_bias",)

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
        return self.score(self.user_emb(users), self.item_emb(items), self.user_bias(users),
                          self.item_bias(items).squeeze(-1), self.offset)

    @staticmethod
    def score(p: torch.Tensor, q: torch.Tensor, user_bias: torch.Tensor,
              item_bias: torch.Tensor, offset: float) -> torch.Tensor:
        """``<p, q_k> + b_u + b_k + offset`` from looked-up rows: user rows ``p [..., d]``
        and ``user_bias [..., 1]``, item rows ``q [..., K, d]`` and ``item_bias [..., K]``
        (the batched engine scores its gathered rows with it too)."""
        return (q * p.unsqueeze(-2)).sum(-1) + user_bias + item_bias + offset

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
    ITEM_MODULES = ("item_gmf", "item_mlp")

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
    ITEM_MODULES = ("item_emb",)

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


class _FeatureModel(MF):
    """Ids plus side features: hashed value ids per item (``item_values``, public, from
    the catalogue) and per user (``user_values``, the client's own users; held in a
    non-persistent buffer, so never in a state dict and never sent). Value embeddings
    and biases are shared weights. Without features every slot is empty (id 0) and the
    model sees ids only. The id tables are MF's (same names, same local/shared split).

    With ``context`` the model has a small shared table of context rows (hour of day,
    day of week, the item's age then; ``fedrec.features``), and ``users`` may come as
    ``[B, 1 + CONTEXT_COLUMNS]``: the user id, then the example's hour row, weekday row
    and year (``fedrec.features.with_context``). Hour and weekday join the user's values,
    the item's age (year minus its release year) its item's values. A plain ``[B]`` of
    user ids means no context (empty slots)."""

    def __init__(self, n_users: int, n_items: int, dim: int, buckets: int,
                 init_std: float, offset: float, gen: torch.Generator | None,
                 id_dropout: float = 0.0, text_dim: int = 0, context: bool = False) -> None:
        super().__init__(n_users, n_items, dim, init_std, offset, gen)
        self.user_value_emb = _init(Embedding(buckets, dim), init_std, gen)
        self.item_value_emb = _init(Embedding(buckets, dim), init_std, gen)
        self.user_value_bias = Embedding(buckets, 1)
        self.item_value_bias = Embedding(buckets, 1)
        for table in (self.user_value_bias, self.item_value_bias):
            nn.init.zeros_(table.weight)
        self.id_dropout = id_dropout
        self.per_example_lookups = True  # see _item_content
        self.dp_wrapped = False  # set by fedrec.privacy.make_private, never cleared
        # reproducible masks for non-private runs; fedrec.privacy.make_private replaces it
        # with an OS-seeded generator (DP-SGD's sensitivity argument needs masks nobody
        # can predict, drawn independently per example)
        self._dropout_gen = torch.Generator().manual_seed(0)
        self.register_buffer("item_values", torch.zeros(n_items, ITEM_SLOTS, dtype=torch.long),
                             persistent=False)
        self.register_buffer("user_values", torch.zeros(n_users, USER_SLOTS, dtype=torch.long),
                             persistent=False)
        # item-text=on: public title vectors (zero: no text), projected by a shared layer
        self.text_proj = Linear(text_dim, dim, bias=False) if text_dim else None
        self.register_buffer("item_text", torch.zeros(n_items, text_dim), persistent=False)
        # context=on/auto: shared context rows; each item's release year (0: unknown)
        self.context_emb = (_init(Embedding(CONTEXT_ROWS, dim), init_std, gen) if context
                            else None)
        self.context_bias = Embedding(CONTEXT_ROWS, 1) if context else None
        if self.context_bias is not None:
            nn.init.zeros_(self.context_bias.weight)
        self.register_buffer("item_year", torch.zeros(n_items, dtype=torch.long),
                             persistent=False)
        self.register_buffer("age_edges", torch.tensor(AGE_EDGES), persistent=False)
        self.reads_context = False  # set by set_features (``Features.context``)

    def set_features(self, features: Features) -> None:
        """Load the value ids of this model's items and users."""
        for name, ids, n in (("item_values", features.items, self.n_items),
                             ("user_values", features.users, self.n_users)):
            buf = getattr(self, name)
            if ids.dim() != 2 or ids.shape[0] != n or not 1 <= ids.shape[1] <= buf.shape[1]:
                raise ValueError(f"{name}: expected shape ({n}, 1..{buf.shape[1]}), got "
                                 f"{tuple(ids.shape)}")
            if ids.numel() and (ids.min() < 0 or ids.max() >= self.user_value_emb.num_embeddings):
                raise ValueError(f"{name}: value ids outside [0, "
                                 f"{self.user_value_emb.num_embeddings})")
            self.register_buffer(name, ids.to(buf.device, torch.long).clone(), persistent=False)
        if (features.text is None) != (self.text_proj is None):
            raise ValueError("item text: the model was built with item-text="
                             f"{'on' if self.text_proj is not None else 'off'} but the "
                             f"features {'lack' if features.text is None else 'have'} it")
        if features.text is not None:
            want = tuple(self.item_text.shape)
            if tuple(features.text.shape) != want or not torch.isfinite(features.text).all():
                raise ValueError(f"item_text: expected finite values of shape {want}, got "
                                 f"{tuple(features.text.shape)}")
            self.register_buffer("item_text", features.text.to(
                self.item_text.device, self.item_text.dtype).clone(), persistent=False)
        if features.context and self.context_emb is None:
            raise ValueError("context: the features ask for it but the model was built "
                             "with context=off")
        self.reads_context = features.context
        if features.years is not None:
            if tuple(features.years.shape) != (self.n_items,):
                raise ValueError(f"item years: expected shape ({self.n_items},), got "
                                 f"{tuple(features.years.shape)}")
            self.register_buffer("item_year", features.years.to(
                self.item_year.device, torch.long).clone(), persistent=False)

    def _ids(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """User ids ``[B]`` and the context columns ``[B, CONTEXT_COLUMNS]`` (None if the
        input has none)."""
        if users.dim() == 1:
            return users, None
        if users.dim() != 2 or users.shape[1] != 1 + CONTEXT_COLUMNS:
            raise ValueError(f"users: expected [B] ids or [B, {1 + CONTEXT_COLUMNS}] ids "
                             f"with context, got {tuple(users.shape)}")
        return users[:, 0], users[:, 1:]

    def _context(self, ctx: torch.Tensor | None, items: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Context rows looked up once (Opacus): the user-side part ``[B, 2, d]`` (hour,
        weekday) and the item-side part ``[B, K, d]`` (the item's age), empty rows
        zeroed; their masks ``[B, 2 + K]`` and biases ``[B, 2 + K]``."""
        assert self.context_emb is not None and self.context_bias is not None
        b, k = items.shape
        if ctx is None:
            ids = torch.zeros(b, 2 + k, dtype=torch.long, device=items.device)
        else:
            year = self.item_year[items]  # [B, K]
            age = (ctx[:, 2:3] - year).clamp(min=0)
            rows = AGE_ROW + torch.bucketize(age, self.age_edges, right=True)
            known = (year > 0) & (ctx[:, 2:3] > 0)  # the item's year and the moment's
            ids = torch.cat([ctx[:, :2], torch.where(known, rows, 0)], dim=1)
        m = (ids > 0).to(self.item_emb.weight.dtype)
        e = self.context_emb(ids) * m.unsqueeze(-1)
        return e, m, self.context_bias(ids).squeeze(-1) * m

    def _item_content(self, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per (example, item): the sum and the sum of squares of the item's value
        embeddings, its value biases summed, and its number of values.

        With ``per_example_lookups`` (the default, and what DP-SGD needs: Opacus computes
        per-example norms from lookups indexed by example) the value table is looked up
        with ``[B, K, Si]`` ids. Without it (non-private training, set by
        ``fedrec.central.build_trainer``; and scoring without gradients) the same
        quantities are computed once per catalogue item and gathered: equal values, far
        fewer lookups.
        """
        if (self.per_example_lookups or self.dp_wrapped) and torch.is_grad_enabled():
            ids = self.item_values[items]  # [B, K, Si]
        else:
            ids = self.item_values  # [n_items, Si]
        m = (ids > 0).to(self.item_emb.weight.dtype)
        v = self.item_value_emb(ids) * m.unsqueeze(-1)
        parts = (v.sum(-2), (v * v).sum((-2, -1)),
                 (self.item_value_bias(ids).squeeze(-1) * m).sum(-1), m.sum(-1))
        if self.text_proj is not None:  # the title vector, projected: one more value
            text = self.item_text[items] if ids.dim() == 3 else self.item_text
            has = (text.abs().sum(-1) > 0).to(text.dtype)
            t = self.text_proj(text) * has.unsqueeze(-1)
            parts = (parts[0] + t, parts[1] + (t * t).sum(-1), parts[2], parts[3] + has)
        if ids.dim() == 2:
            parts = tuple(t[items] for t in parts)
        return parts

    def _parts(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embeddings and first-order terms, each table looked up once (Opacus).

        Returns p ``[B, d]``, q ``[B, K, d]``, user values ``[B, Su, d]`` (empty slots
        zeroed) and their mask, the item values' sum ``[B, K, d]``, sum of squares and
        count ``[B, K]``, and the first-order sum ``[B, K]``.
        """
        users, ctx = self._ids(users)
        uv_ids = self.user_values[users]
        mu = (uv_ids > 0).to(self.item_emb.weight.dtype)
        p, q = self.user_emb(users), self.item_emb(items)
        item_bias = self.item_bias(items).squeeze(-1)
        if self.training and self.id_dropout > 0:  # the content must score items alone
            keep = (torch.rand(items.shape, generator=self._dropout_gen) >= self.id_dropout
                    ).to(q.dtype).to(q.device)
            q, item_bias = q * keep.unsqueeze(-1), item_bias * keep
        uv = self.user_value_emb(uv_ids) * mu.unsqueeze(-1)
        iv_sum, iv_sq, iv_bias, iv_n = self._item_content(items)
        first = (self.user_bias(users) + item_bias + iv_bias
                 + (self.user_value_bias(uv_ids).squeeze(-1) * mu).sum(1, keepdim=True))
        if self.context_emb is not None:  # hour and weekday as user values, age as item's
            e, m, cb = self._context(ctx if self.reads_context else None, items)
            uv, mu = torch.cat([uv, e[:, :2]], 1), torch.cat([mu, m[:, :2]], 1)
            iv_sum, iv_sq = iv_sum + e[:, 2:], iv_sq + (e[:, 2:] * e[:, 2:]).sum(-1)
            iv_n = iv_n + m[:, 2:]
            first = first + cb[:, :2].sum(1, keepdim=True) + cb[:, 2:]
        return p, q, uv, mu, iv_sum, iv_sq, iv_n, first

    @staticmethod
    def _deep_input(p: torch.Tensor, q: torch.Tensor, uv: torch.Tensor, mu: torch.Tensor,
                    iv_sum: torch.Tensor, iv_n: torch.Tensor) -> torch.Tensor:
        """Field vectors side by side: user, item, mean user value, mean item value."""
        k = q.shape[1]
        u_mean = uv.sum(1) / mu.sum(1, keepdim=True).clamp(min=1)  # [B, d]
        i_mean = iv_sum / iv_n.unsqueeze(-1).clamp(min=1)  # [B, K, d]
        return torch.cat([p.unsqueeze(1).expand(-1, k, -1), q,
                          u_mean.unsqueeze(1).expand(-1, k, -1), i_mean], dim=-1)

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """Scores ``[U, n_items]`` through ``forward`` in small chunks (not MF's product:
        features make each score costlier)."""
        return RecModel.score_all(self, users, chunk)

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """Item embedding and mean item-value embedding side by side ``[n_items, 2d]``."""
        ids = self.item_values
        mask = (ids > 0).to(self.item_emb.weight.dtype).unsqueeze(-1)
        content = (self.item_value_emb(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.cat([self.item_emb.weight, content], dim=1).detach()


class DeepFM(_FeatureModel):
    """DeepFM (Guo et al., 2017): first-order weights, a factorization machine over every
    active feature (user id, item id, user values, item values) and an MLP over the field
    vectors, summed."""

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...],
                 buckets: int, init_std: float = 0.1, offset: float = 0.0,
                 gen: torch.Generator | None = None, id_dropout: float = 0.0,
                 text_dim: int = 0, context: bool = False) -> None:
        super().__init__(n_users, n_items, dim, buckets, init_std, offset, gen, id_dropout,
                         text_dim, context)
        self.mlp = _mlp(hidden, 4 * dim)
        self.out = Linear(hidden[-1], 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, K]``."""
        p, q, uv, mu, iv_sum, iv_sq, iv_n, first = self._parts(users, items)
        total = p.unsqueeze(1) + q + uv.sum(1).unsqueeze(1) + iv_sum  # [B, K, d]
        squares = ((p * p).sum(-1, keepdim=True) + (q * q).sum(-1)
                   + (uv * uv).sum((1, 2)).unsqueeze(1) + iv_sq)  # [B, K]
        fm = 0.5 * ((total * total).sum(-1) - squares)
        deep = self.out(self.mlp(self._deep_input(p, q, uv, mu, iv_sum, iv_n))).squeeze(-1)
        return first + fm + deep + self.offset


# odd multipliers that mix a (user value, item value) pair into a cross-feature id
_CROSS_A, _CROSS_B = 0x9E3779B1, 0x85EBCA77


class WideDeep(_FeatureModel):
    """Wide & Deep (Cheng et al., 2016): a wide linear part (first-order weights plus
    hashed crosses of every user value with every item value, e.g. occupation x genre)
    and a deep MLP over the field vectors, summed."""

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...],
                 buckets: int, init_std: float = 0.1, offset: float = 0.0,
                 gen: torch.Generator | None = None, id_dropout: float = 0.0,
                 text_dim: int = 0, context: bool = False) -> None:
        super().__init__(n_users, n_items, dim, buckets, init_std, offset, gen, id_dropout,
                         text_dim, context)
        self.cross = Embedding(8 * buckets, 1)
        nn.init.zeros_(self.cross.weight)
        self.mlp = _mlp(hidden, 4 * dim)
        self.out = Linear(hidden[-1], 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, K]``."""
        p, q, uv, mu, iv_sum, _, iv_n, first = self._parts(users, items)
        uv_ids, iv_ids = self.user_values[self._ids(users)[0]], self.item_values[items]
        mi, mu_ids = (iv_ids > 0).to(q.dtype), (uv_ids > 0).to(q.dtype)
        k = items.shape[1]
        pair = (uv_ids[:, None, :, None] * _CROSS_A
                ^ iv_ids[:, :, None, :] * _CROSS_B)  # [B, K, Su, Si]
        cross_ids = 1 + pair.remainder(self.cross.num_embeddings - 1)
        cross_mask = mu_ids[:, None, :, None] * mi[:, :, None, :]
        pairs = uv_ids.shape[1] * iv_ids.shape[2]
        b = len(uv_ids)
        wide = first + (self.cross(cross_ids.reshape(b, k, pairs)).squeeze(-1)
                        * cross_mask.reshape(b, k, pairs)).sum(-1)
        deep = self.out(self.mlp(self._deep_input(p, q, uv, mu, iv_sum, iv_n))).squeeze(-1)
        return wide + deep + self.offset


def build_model(cfg: ModelConfig, n_users: int, n_items: int, *, offset: float = 0.0,
                seed: int = 0, features: Features | None = None) -> RecModel:
    """Instantiate the configured model, initialised from its own generator seeded with
    ``seed`` (the global torch generator is neither used nor re-seeded). ``features``:
    the value ids of the side features (deepfm, widedeep; ignored by id-only models).

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
        elif cfg.model in ("deepfm", "widedeep"):
            cls = DeepFM if cfg.model == "deepfm" else WideDeep
            model = cls(n_users, n_items, cfg.dim, cfg.hidden_sizes, cfg.feature_buckets,
                        cfg.init_std, offset, gen, cfg.id_dropout,
                        TEXT_DIM if cfg.item_text == "on" else 0, cfg.context != "off")
        else:
            model = EmbeddingMLP(n_users, n_items, cfg.dim, cfg.hidden_sizes, cfg.init_std,
                                 offset, gen)
    _init_linear(model, gen)
    if features is not None and isinstance(model, _FeatureModel):
        model.set_features(features)
    return model
