"""Synthetic liked-item data with MovieLens-20M statistics, and Zipf-skewed bags.

:func:`generate_liked_items` is the pipeline's embedded default dataset: by default
65,000 users, 20,500 items, P ≈ 45 liked items per user (log-normal spread, at least 5),
a Zipf-like item-popularity curve, and likes drawn from a latent-factor model so that a
model can learn them (a dense DLRM reaches AUC > 0.75 on held-out likes):

* every item ``v`` has a popularity weight ``w_v ∝ (rank_v + offset)^-alpha`` (ranks are
  shuffled over item ids, as MovieLens ids are not ordered by popularity) and a latent
  taste ``c_v`` (one of ``num_tastes``);
* every user ``u`` has a taste mixture ``π_u ~ Dirichlet(taste_concentration)``;
* each like is drawn, without replacement, with probability
  ``noise · w_v / Σw + (1 - noise) · π_u[c_v] · w_v / Σ_{c_v' = c_v} w_v'``.

:func:`zipf_bags` is the small generator of Zipf-skewed ``(indices, offsets)`` used by
the benchmarks.
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

from torchrec_tt.data.liked import LikedItems


@dataclass
class SyntheticConfig:
    """Parameters of :func:`generate_liked_items` (defaults: MovieLens-20M statistics).

    Args:
        num_users (int): users (all kept: each has at least ``min_liked`` likes).
        num_items (int): items.
        mean_liked (float): target mean likes per user (the history pooling factor P).
        min_liked (int): fewest likes per user (the paper drops users with <= 4).
        liked_sigma (float): log-normal spread of likes per user.
        zipf_alpha (float): exponent of the popularity curve.
        zipf_offset (float): rank offset of the popularity curve (flattens the head).
        num_tastes (int): latent tastes (item clusters; MovieLens has 20 genres).
        taste_concentration (float): Dirichlet concentration of users' taste mixtures;
            smaller means users focus on fewer tastes (stronger signal).
        noise (float): share of likes drawn from global popularity, ignoring tastes.
        seed (int): random seed; the data is a pure function of the config.
    """

    num_users: int = 65_000
    num_items: int = 20_500
    mean_liked: float = 45.0
    min_liked: int = 5
    liked_sigma: float = 1.0
    zipf_alpha: float = 1.0
    zipf_offset: float = 20.0
    num_tastes: int = 20
    taste_concentration: float = 0.1
    noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig: {name}={getattr(self, name)!r} {why}")

        check(self.num_users >= 1, "num_users", "must be >= 1")
        check(self.min_liked >= 1, "min_liked", "must be >= 1")
        check(self.num_items >= 2 * self.min_liked, "num_items", f"must be >= 2 * min_liked = {2 * self.min_liked}")
        check(self.mean_liked > self.min_liked, "mean_liked", f"must be > min_liked = {self.min_liked}")
        check(self.liked_sigma >= 0, "liked_sigma", "must be >= 0")
        check(self.zipf_alpha >= 0, "zipf_alpha", "must be >= 0")
        check(self.zipf_offset >= 0, "zipf_offset", "must be >= 0")
        check(self.num_tastes >= 1, "num_tastes", "must be >= 1")
        check(self.taste_concentration > 0, "taste_concentration", "must be > 0")
        check(0.0 <= self.noise <= 1.0, "noise", "must be in [0, 1]")


def zipf_weights(num: int, alpha: float, offset: float = 0.0) -> np.ndarray:
    """Unnormalized popularity ``(rank + 1 + offset)^-alpha`` of ranks ``0 … num-1``."""
    return (np.arange(1, num + 1, dtype=np.float64) + offset) ** -alpha


def _stacked_cdf(weights: np.ndarray, groups: np.ndarray, num_groups: int) -> Tuple[np.ndarray, np.ndarray]:
    """Members of every group (sorted by group) and ``group + within-group CDF``.

    ``members[searchsorted(cdf, g + U(0,1))]`` samples a member of group ``g`` with
    probability proportional to its weight: all groups are sampled with one search.
    """
    members = np.argsort(groups, kind="stable")
    w, g = weights[members], groups[members]
    cum = np.cumsum(w)
    start = np.searchsorted(g, np.arange(num_groups), side="left")
    end = np.searchsorted(g, np.arange(num_groups), side="right")
    before = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    total = cum[np.maximum(end - 1, 0)] - before
    cdf = g + (cum - before[g]) / total[g]
    last = np.append(g[1:] != g[:-1], True)
    cdf[last] = g[last] + 1.0  # exact group ends: no rounding leaks into the next group
    return members, cdf


def _sample_stacked(members: np.ndarray, cdf: np.ndarray, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pos = np.searchsorted(cdf, group + rng.random(len(group)), side="right")
    return members[np.minimum(pos, len(members) - 1)]


@dataclass
class SyntheticLatents:
    """The hidden factors behind :func:`generate_liked_items` (for tests and oracles).

    Attributes:
        popularity: ``(num_items,)`` popularity weights.
        item_taste: ``(num_items,)`` taste of every item.
        user_mixture: ``(num_users, num_tastes)`` taste mixture of every user.
        noise: share of likes drawn from popularity alone.
    """

    popularity: torch.Tensor
    item_taste: torch.Tensor
    user_mixture: torch.Tensor
    noise: float

    def like_probability(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Probability that one draw of user ``u``'s likes is item ``v`` (before dedup)."""
        taste_total = torch.zeros(self.user_mixture.shape[1], dtype=torch.float64).index_add_(
            0, self.item_taste, self.popularity
        )
        pop = self.popularity[items]
        return self.noise * pop / self.popularity.sum() + (1 - self.noise) * self.user_mixture[
            users, self.item_taste[items]
        ] * pop / taste_total[self.item_taste[items]]


def generate_liked_items(
    config: Optional[SyntheticConfig] = None, return_latents: bool = False, **overrides
) -> Union[LikedItems, Tuple[LikedItems, SyntheticLatents]]:
    """Synthetic liked-item histories with learnable structure (see the module docstring).

    Args:
        config (Optional[SyntheticConfig]): parameters; defaults to ML-20M statistics.
        return_latents (bool): also return the hidden :class:`SyntheticLatents`.
        **overrides: fields of :class:`SyntheticConfig` to replace, e.g. ``num_users=1000``.

    Returns:
        LikedItems: ``num_users`` users; every user has at least ``min_liked`` likes
        (and the latents if ``return_latents``).

    Example::

        liked = generate_liked_items(num_users=2000, num_items=1000, mean_liked=20)
        liked.stats()["P"]  # ~20
    """
    cfg = SyntheticConfig(**{**asdict(config or SyntheticConfig()), **overrides})
    rng = np.random.default_rng(cfg.seed)
    num_users, num_items = cfg.num_users, cfg.num_items
    tastes = min(cfg.num_tastes, num_items)

    # Items: popularity (ranks shuffled over ids) and one latent taste each (balanced).
    popularity = np.empty(num_items)
    popularity[rng.permutation(num_items)] = zipf_weights(num_items, cfg.zipf_alpha, cfg.zipf_offset)
    item_taste = rng.permutation(num_items) % tastes
    taste_members, taste_cdf = _stacked_cdf(popularity, item_taste, tastes)
    all_members, all_cdf = _stacked_cdf(popularity, np.zeros(num_items, dtype=np.int64), 1)

    # Users: taste mixtures (flattened CDF over (user, taste)) and like counts.
    mixture = rng.dirichlet(np.full(tastes, cfg.taste_concentration), size=num_users)
    mixture_cdf = (np.cumsum(mixture, axis=1) + np.arange(num_users)[:, None]).reshape(-1)
    mixture_cdf[tastes - 1 :: tastes] = np.arange(1, num_users + 1)
    extra = cfg.mean_liked - cfg.min_liked + 0.5  # E[floor(X)] ≈ E[X] - 1/2
    mu = math.log(extra) - cfg.liked_sigma**2 / 2
    max_liked = max(cfg.min_liked, num_items // 4)
    target = np.minimum(cfg.min_liked + np.floor(rng.lognormal(mu, cfg.liked_sigma, num_users)), max_liked)
    target = target.astype(np.int64)

    # Draw likes with replacement in rounds; keeping each user's first distinct draws is
    # sampling without replacement. Keys u * num_items + v stay sorted between rounds.
    keys = np.empty(0, dtype=np.int64)
    have = np.zeros(num_users, dtype=np.int64)
    for _ in range(64):
        need = target - have
        users = np.nonzero(need > 0)[0]
        if users.size == 0:
            break
        draws_per_user = 2 * need[users] + 4
        user = np.repeat(users, draws_per_user)
        from_taste = rng.random(len(user)) >= cfg.noise
        taste = np.searchsorted(mixture_cdf, user[from_taste] + rng.random(int(from_taste.sum())), side="right")
        item = np.empty(len(user), dtype=np.int64)
        item[from_taste] = _sample_stacked(taste_members, taste_cdf, taste - user[from_taste] * tastes, rng)
        item[~from_taste] = _sample_stacked(all_members, all_cdf, np.zeros(int((~from_taste).sum())), rng)
        new = user * num_items + item
        if len(keys):
            pos = np.minimum(np.searchsorted(keys, new), len(keys) - 1)
            new = new[keys[pos] != new]  # drop items the user already likes
        order = np.argsort(new, kind="stable")
        is_first = np.ones(len(new), dtype=bool)
        is_first[1:] = new[order][1:] != new[order][:-1]
        first = order[is_first]
        new = new[np.sort(first)]  # distinct, in draw order (first occurrence)
        new_user = new // num_items
        rank = np.arange(len(new)) - np.searchsorted(new_user, new_user, side="left")
        new = new[rank < need[new_user]]
        keys = np.sort(np.concatenate([keys, new]))
        have = np.bincount(keys // num_items, minlength=num_users)
    if have.min() < cfg.min_liked:
        raise ValueError(
            f"SyntheticConfig: {int((have < cfg.min_liked).sum())} users got fewer than min_liked={cfg.min_liked} "
            f"distinct likes; raise noise (now {cfg.noise}) or num_items (now {num_items})"
        )
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(have, out=offsets[1:])
    liked = LikedItems(offsets=torch.from_numpy(offsets), items=torch.from_numpy(keys % num_items), num_items=num_items)
    if not return_latents:
        return liked
    return liked, SyntheticLatents(
        popularity=torch.from_numpy(popularity),
        item_taste=torch.from_numpy(item_taste.astype(np.int64)),
        user_mixture=torch.from_numpy(mixture),
        noise=cfg.noise,
    )


def zipf_bags(
    num_rows: int,
    batch_size: int,
    pooling_factor: int,
    alpha: float = 1.0,
    seed: int = 0,
    shuffle_rows: bool = True,
    variable_lengths: bool = False,
    dtype: torch.dtype = torch.int64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch of embedding bags with Zipf-skewed row ids (for benchmarks and tests).

    Row ``r`` of popularity rank ``k`` is drawn with probability ``∝ (k + 1)^-alpha``.

    Args:
        num_rows (int): rows of the table.
        batch_size (int): bags ``B``.
        pooling_factor (int): ids per bag (the mean when ``variable_lengths``).
        alpha (float): Zipf exponent; 0 is uniform.
        seed (int): random seed.
        shuffle_rows (bool): scatter the popularity ranks over the row ids (raw data);
            ``False`` makes row ``k`` the ``k``-th most popular (frequency-renumbered data).
        variable_lengths (bool): Poisson bag lengths instead of fixed ones.
        dtype (torch.dtype): ``torch.int64`` or ``torch.int32`` for indices and offsets.

    Returns:
        ``(indices, offsets)``: ``(L,)`` ids and ``(B + 1,)`` offsets with ``offsets[-1] == L``.

    Example::

        indices, offsets = zipf_bags(23_100, batch_size=256, pooling_factor=45, alpha=1.0)
    """
    if num_rows < 1 or batch_size < 0 or pooling_factor < 0:
        raise ValueError(
            f"zipf_bags: need num_rows >= 1, batch_size >= 0, pooling_factor >= 0; "
            f"got {num_rows}, {batch_size}, {pooling_factor}"
        )
    if dtype not in (torch.int32, torch.int64):
        raise ValueError(f"zipf_bags: dtype must be torch.int32 or torch.int64, got {dtype}")
    g = torch.Generator().manual_seed(seed)
    if variable_lengths:
        lengths = torch.poisson(torch.full((batch_size,), float(pooling_factor)), generator=g).to(torch.int64)
    else:
        lengths = torch.full((batch_size,), pooling_factor, dtype=torch.int64)
    offsets = torch.zeros(batch_size + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    cdf = torch.from_numpy(np.cumsum(zipf_weights(num_rows, alpha)))
    ranks = torch.searchsorted(cdf, torch.rand(int(offsets[-1]), generator=g, dtype=torch.float64) * cdf[-1])
    ranks = ranks.clamp_(max=num_rows - 1)
    indices = torch.randperm(num_rows, generator=g)[ranks] if shuffle_rows else ranks
    return indices.to(dtype), offsets.to(dtype)
