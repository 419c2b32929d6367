"""Synthetic benchmark inputs: Zipf-skewed bags of a fixed pooling factor."""

from typing import Tuple

import torch


def zipf_bags(
    num_rows: int,
    batch_size: int,
    pooling_factor: int,
    alpha: float = 1.05,
    seed: int = 0,
    shuffle_ids: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` bags of ``pooling_factor`` ids drawn from a Zipf(alpha) popularity curve.

    With ``shuffle_ids`` the popularity rank is scattered over the id space (ids as they
    come from a raw catalogue, before any frequency-aware renumbering).

    Returns:
        ``(indices, offsets)``: ``(B * P,)`` int64 ids and ``(B + 1,)`` int64 offsets.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, num_rows + 1, dtype=torch.float64).pow(-alpha)
    ranks = torch.multinomial(weights, batch_size * pooling_factor, replacement=True, generator=gen)
    ids = torch.randperm(num_rows, generator=gen)[ranks] if shuffle_ids else ranks
    offsets = torch.arange(0, batch_size * pooling_factor + 1, pooling_factor, dtype=torch.int64)
    return ids.to(torch.int64), offsets
