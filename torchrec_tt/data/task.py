"""The liked-item prediction task: held-out likes, sampled negatives, KJT batches.

Every user's liked items are split once (seeded): one random like is held out as the
test positive; the rest, ``H_u``, is the user's history. An example is a history bag
(feature ``"history"``), a candidate item (feature ``"candidate"``) and a label:

* training positive: a random ``v ∈ H_u`` with the bag ``H_u \\ {v}`` (leave-one-out);
* training negative: a sampled item the user never liked, with ``H_u`` minus one random
  item (so positive and negative bags have the same length: no length leak);
* test: the held-out like and sampled negatives, each with the bag ``H_u``.

Negatives are drawn in proportion to training popularity (default: the model must
learn users' tastes, not item popularity) or uniformly.
"""

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.data.liked import LikedItems

HISTORY = "history"
CANDIDATE = "candidate"
NEGATIVE_SAMPLING = ("popularity", "uniform")


@dataclass
class Examples:
    """Examples as parallel ``(n,)`` tensors.

    Attributes:
        users: user of each example.
        candidates: candidate item.
        labels: 1.0 liked, 0.0 sampled negative.
        drop: position in the user's history to leave out of the bag, or -1.
    """

    users: torch.Tensor
    candidates: torch.Tensor
    labels: torch.Tensor
    drop: torch.Tensor

    def __len__(self) -> int:
        return self.users.numel()

    def subset(self, index: torch.Tensor) -> "Examples":
        return Examples(self.users[index], self.candidates[index], self.labels[index], self.drop[index])


@dataclass
class Batch:
    """One batch: ``dense`` ``(B, 1)`` features, ``sparse`` KJT (history, candidate),
    ``labels`` ``(B,)`` and ``valid`` ``(B,)`` (False for padding in the last eval batch)."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    valid: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.dense.to(device), self.sparse.to(device), self.labels.to(device), self.valid.to(device))


class LikedTask:
    """Leave-out split of liked items, negative sampling and batching.

    Args:
        liked (LikedItems): the data (MovieLens or synthetic).
        negatives (str): ``"popularity"`` (default) or ``"uniform"`` negative sampling.
        train_positives (int): training positives per user and epoch.
        train_negatives (int): negatives per training positive.
        test_negatives (int): negatives per held-out like.
        seed (int): seed of the split and of all sampling.
    """

    def __init__(
        self,
        liked: LikedItems,
        negatives: str = "popularity",
        train_positives: int = 1,
        train_negatives: int = 1,
        test_negatives: int = 1,
        seed: int = 0,
    ) -> None:
        if negatives not in NEGATIVE_SAMPLING:
            raise ValueError(f"LikedTask: negatives={negatives!r} must be one of {NEGATIVE_SAMPLING}")
        lengths = liked.lengths()
        if liked.num_users == 0 or int(lengths.min()) < 3:
            raise ValueError(
                "LikedTask: every user needs at least 3 liked items (one held out, one left out, one kept)"
            )
        self.liked = liked
        self.num_items = liked.num_items
        self.negatives = negatives
        self.train_positives = train_positives
        self.train_negatives = train_negatives
        self.test_negatives = test_negatives
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        # Hold out one random like per user: swap it to the end of the user's slice.
        held = liked.offsets[:-1] + (torch.rand(liked.num_users, generator=g) * lengths).long()
        items = liked.items.clone()
        last = liked.offsets[1:] - 1
        items[held], items[last] = liked.items[last], liked.items[held]
        self.test_items = items[last]
        keep = torch.ones(items.numel(), dtype=torch.bool)
        keep[last] = False
        self.history_items = items[keep]
        self.history_lengths = lengths - 1
        self.history_offsets = torch.zeros(liked.num_users + 1, dtype=torch.int64)
        torch.cumsum(self.history_lengths, 0, out=self.history_offsets[1:])
        self.item_counts = torch.bincount(self.history_items, minlength=self.num_items)
        self._liked_keys = torch.sort(liked.user_of_like() * self.num_items + liked.items).values
        if negatives == "popularity":
            weights = self.item_counts.double() + 1.0  # +1: items only liked in the test split can be drawn
        else:
            weights = torch.ones(self.num_items, dtype=torch.float64)
        self._negative_cdf = torch.cumsum(weights, 0)

    @property
    def num_users(self) -> int:
        return self.liked.num_users

    def _is_liked(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = users * self.num_items + items
        pos = torch.searchsorted(self._liked_keys, keys).clamp_(max=self._liked_keys.numel() - 1)
        return self._liked_keys[pos] == keys

    def sample_negatives(self, users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One item per entry of ``users`` that the user never liked."""
        cdf = self._negative_cdf
        items = torch.empty_like(users)
        todo = torch.arange(users.numel())
        for _ in range(1000):
            if todo.numel() == 0:
                return items
            draw = torch.searchsorted(cdf, torch.rand(todo.numel(), generator=generator, dtype=torch.float64) * cdf[-1])
            items[todo] = draw.clamp_(max=self.num_items - 1)
            todo = todo[self._is_liked(users[todo], items[todo])]
        raise ValueError(
            f"LikedTask: could not sample negatives for users {users[todo][:5].tolist()} (they like almost every item)"
        )

    def train_examples(self, epoch: int = 0) -> Examples:
        """``train_positives`` positives per user, ``train_negatives`` negatives per positive,
        shuffled (seeded by ``epoch``)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
        users = torch.arange(self.num_users).repeat(self.train_positives)
        pos_drop = (torch.rand(users.numel(), generator=g) * self.history_lengths[users]).long()
        pos_items = self.history_items[self.history_offsets[users] + pos_drop]
        neg_users = users.repeat(self.train_negatives)
        neg_drop = (torch.rand(neg_users.numel(), generator=g) * self.history_lengths[neg_users]).long()
        examples = Examples(
            users=torch.cat([users, neg_users]),
            candidates=torch.cat([pos_items, self.sample_negatives(neg_users, g)]),
            labels=torch.cat([torch.ones(users.numel()), torch.zeros(neg_users.numel())]),
            drop=torch.cat([pos_drop, neg_drop]),
        )
        return examples.subset(torch.randperm(len(examples), generator=g))

    def test_examples(self, max_users: Optional[int] = None) -> Examples:
        """Held-out like plus ``test_negatives`` negatives for (the first ``max_users``) users."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003)
        n = self.num_users if max_users is None else min(max_users, self.num_users)
        users = torch.randperm(self.num_users, generator=g)[:n].sort().values
        neg_users = users.repeat(self.test_negatives)
        return Examples(
            users=torch.cat([users, neg_users]),
            candidates=torch.cat([self.test_items[users], self.sample_negatives(neg_users, g)]),
            labels=torch.cat([torch.ones(n), torch.zeros(neg_users.numel())]),
            drop=torch.full((n + neg_users.numel(),), -1, dtype=torch.int64),
        )

    def history_bags(
        self, users: torch.Tensor, drop: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(values, lengths)`` of the users' history bags, minus position ``drop`` (if >= 0)."""
        full = self.history_lengths[users]
        starts = self.history_offsets[users]
        total = int(full.sum())
        bag = torch.repeat_interleave(torch.arange(users.numel()), full, output_size=total)
        bag_start = torch.cumsum(full, 0) - full
        pos = torch.arange(total) - bag_start[bag]
        values = self.history_items[starts[bag] + pos]
        if drop is None:
            return values, full
        keep = pos != drop[bag]
        return values[keep], full - (drop >= 0).long()

    def history_batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(indices, offsets)`` of every user's full history bag, ``batch_size`` users at a time."""
        for start in range(0, self.num_users, batch_size):
            values, lengths = self.history_bags(torch.arange(start, min(start + batch_size, self.num_users)))
            offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=offsets[1:])
            yield values, offsets

    def make_batch(self, examples: Examples, valid: Optional[torch.Tensor] = None) -> Batch:
        """KJT batch of examples; dense feature = log(1 + history length)."""
        values, lengths = self.history_bags(examples.users, examples.drop)
        n = len(examples)
        sparse = KeyedJaggedTensor(
            keys=[HISTORY, CANDIDATE],
            values=torch.cat([values, examples.candidates]),
            lengths=torch.cat([lengths, torch.ones(n, dtype=torch.int64)]),
            stride=n,
        )
        dense = torch.log1p(lengths.float()).unsqueeze(1)
        return Batch(dense, sparse, examples.labels, torch.ones(n, dtype=torch.bool) if valid is None else valid)

    def batches(
        self,
        examples: Examples,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
    ) -> Iterator[Batch]:
        """This rank's share of ``examples`` in batches of ``batch_size``.

        Global step ``s`` uses examples ``[s·W·B, (s+1)·W·B)``, rank ``r`` the ``r``-th
        slice of ``B``: every rank runs the same number of steps. Without ``pad`` the
        incomplete last global batch is dropped (training); with ``pad`` it is filled by
        repeating examples marked ``valid=False`` (evaluation).
        """
        step = batch_size * world_size
        n = len(examples)
        num_steps = -(-n // step) if pad else n // step
        for s in range(num_steps):
            index = torch.arange(s * step + rank * batch_size, s * step + (rank + 1) * batch_size)
            valid = index < n
            yield self.make_batch(examples.subset(index % n), valid)

    def num_batches(self, examples: Examples, batch_size: int, world_size: int = 1, pad: bool = False) -> int:
        step = batch_size * world_size
        return -(-len(examples) // step) if pad else len(examples) // step
