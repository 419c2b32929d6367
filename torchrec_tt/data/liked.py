"""``LikedItems``: every user's liked-item history in CSR form.

The MovieLens loader (:mod:`torchrec_tt.data.movielens`) and the synthetic generator
(:mod:`torchrec_tt.data.synthetic`) both produce it; :mod:`torchrec_tt.data.task` turns it
into training and evaluation batches.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass
class LikedItems:
    """Liked items of ``num_users`` users over ``num_items`` items.

    User ``u`` liked ``items[offsets[u]:offsets[u + 1]]`` (distinct item ids in
    ``[0, num_items)``). ``P`` (the pooling factor of a history bag) is the mean number
    of liked items per user.

    Args:
        offsets (Tensor): ``(num_users + 1,)`` int64, ``offsets[0] == 0``, non-decreasing.
        items (Tensor): ``(offsets[-1],)`` int64 item ids.
        num_items (int): size of the item id space.
        user_ids (Optional[Tensor]): ``(num_users,)`` original user ids (MovieLens ``userId``).
        item_ids (Optional[Tensor]): ``(num_items,)`` original item ids (MovieLens ``movieId``).
    """

    offsets: torch.Tensor
    items: torch.Tensor
    num_items: int
    user_ids: Optional[torch.Tensor] = None
    item_ids: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.offsets.dim() != 1 or self.offsets.numel() < 1 or int(self.offsets[0]) != 0:
            raise ValueError(f"LikedItems: offsets must be 1-D and start at 0, got shape {tuple(self.offsets.shape)}")
        if int(self.offsets[-1]) != self.items.numel():
            raise ValueError(f"LikedItems: offsets[-1]={int(self.offsets[-1])} != len(items)={self.items.numel()}")
        if self.items.numel() and (int(self.items.min()) < 0 or int(self.items.max()) >= self.num_items):
            raise ValueError(f"LikedItems: item ids must lie in [0, {self.num_items})")

    @property
    def num_users(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_likes(self) -> int:
        return self.items.numel()

    def lengths(self) -> torch.Tensor:
        """``(num_users,)`` liked items per user."""
        return self.offsets[1:] - self.offsets[:-1]

    def user_of_like(self) -> torch.Tensor:
        """``(num_likes,)`` user of every like."""
        return torch.repeat_interleave(torch.arange(self.num_users), self.lengths(), output_size=self.num_likes)

    def item_counts(self) -> torch.Tensor:
        """``(num_items,)`` likes per item."""
        return torch.bincount(self.items, minlength=self.num_items)

    def stats(self) -> Dict[str, float]:
        """Users, items with at least one like, likes, P (mean likes per user) and its spread."""
        lengths = self.lengths().double()
        counts = self.item_counts()
        top = torch.sort(counts, descending=True).values.double()
        head = max(1, self.num_items // 100)
        return {
            "users": self.num_users,
            "items": int((counts > 0).sum()),
            "likes": self.num_likes,
            "P": float(lengths.mean()) if self.num_users else 0.0,
            "P_median": float(lengths.median()) if self.num_users else 0.0,
            "P_min": int(lengths.min()) if self.num_users else 0,
            "P_max": int(lengths.max()) if self.num_users else 0,
            # Share of likes on the 1 % most liked items: the head of the popularity curve.
            "top1pct_share": float(top[:head].sum() / max(1.0, float(top.sum()))),
        }
