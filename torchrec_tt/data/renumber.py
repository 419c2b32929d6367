"""Frequency-aware row renumbering: hot rows get consecutive ids, so they share TT groups.

A TT table puts row ``i`` in group ``i // m_{d-1}``; GRT runs one chain per distinct
(bag, group), so bags touch fewer groups (lower P_G) when the rows they use are packed
into few groups. Two orders, both computed from training data only:

* :func:`frequency_renumbering`: rows sorted by access frequency; the hot rows fill the
  first groups.
* :func:`cluster_renumbering`: rows clustered by co-occurrence (which bags use them),
  clusters laid out one after another, rows sorted by frequency inside each cluster.
  Rows that are used together, and the hot rows of each cluster, share groups (lower
  P_G than frequency alone), and rows with similar embeddings get neighbouring ids, so
  they share the leading TT cores' slices: a low-rank TT table fits them much better
  than when similar rows are scattered over the id space.

The mapping is kept in the model as a buffer (saved in its ``state_dict``) and applied to
the ids on the input path (:class:`FeatureRenumbering`).
"""

import contextlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.op_counts import count_ops


def frequency_renumbering(counts: torch.Tensor) -> torch.Tensor:
    """Old id -> new id, most frequent first (ties keep the old order).

    Args:
        counts (Tensor): ``(num_rows,)`` accesses per row in the training data.

    Returns:
        Tensor: ``(num_rows,)`` int64 permutation; ``mapping[old_id] = new_id``.

    Example::

        frequency_renumbering(torch.tensor([1, 5, 0, 5]))  # tensor([2, 0, 3, 1])
    """
    if counts.dim() != 1:
        raise ValueError(f"frequency_renumbering: counts must be 1-D, got shape {tuple(counts.shape)}")
    order = torch.sort(counts, descending=True, stable=True).indices
    mapping = torch.empty_like(order)
    mapping[order] = torch.arange(order.numel(), device=order.device)
    return mapping


def cluster_renumbering(
    offsets: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    num_clusters: int = 32,
    rank: int = 32,
    iterations: int = 25,
    seed: int = 0,
) -> torch.Tensor:
    """Old id -> new id: co-occurrence clusters one after another, hot rows first in each.

    The rows' co-occurrence factors are the top right singular vectors of the
    bag × row incidence matrix (bags scaled by ``1/sqrt(length)``); the leading one,
    which mostly tracks popularity, is dropped, the rest are normalized and clustered
    with spherical k-means. Clusters are ordered by total frequency.

    Args:
        offsets (Tensor): ``(num_bags + 1,)`` bag boundaries of the training bags.
        rows (Tensor): ``(offsets[-1],)`` row ids.
        num_rows (int): size of the id space.
        num_clusters (int): k-means clusters.
        rank (int): singular vectors computed (``svd_lowrank``'s ``q``).
        iterations (int): k-means iterations.
        seed (int): seed of the randomized SVD and the k-means init.

    Returns:
        Tensor: ``(num_rows,)`` int64 permutation; ``mapping[old_id] = new_id``.
    """
    lengths = offsets[1:] - offsets[:-1]
    bags = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=rows.numel())
    counts = torch.bincount(rows, minlength=num_rows)
    num_clusters = max(1, min(num_clusters, num_rows))
    rank = max(1, min(rank, num_rows - 1, lengths.numel() - 1))
    if rows.numel() == 0 or rank < 2:
        return frequency_renumbering(counts)
    scale = lengths.clamp(min=1).double().rsqrt()[bags].float()
    incidence = torch.sparse_coo_tensor(
        torch.stack([bags, rows]), scale, (lengths.numel(), num_rows), check_invariants=False
    ).coalesce()
    with _seeded(seed):
        _, sigma, v = torch.svd_lowrank(incidence, q=rank, niter=2)
    factors = nn.functional.normalize((v * sigma)[:, 1:], dim=1)
    g = torch.Generator().manual_seed(seed)
    # Init: random rows among the 4k most frequent ones (their factors are the best estimated).
    hot = torch.argsort(counts, descending=True)[: 4 * num_clusters]
    centers = factors[hot[torch.randperm(hot.numel(), generator=g)[:num_clusters]]]
    for _ in range(iterations):
        assign = (factors @ centers.T).argmax(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, factors)
        empty = sums.norm(dim=1) == 0
        centers = torch.where(empty[:, None], centers, nn.functional.normalize(sums, dim=1))
    assign = (factors @ centers.T).argmax(1)
    cluster_total = torch.zeros(num_clusters, dtype=torch.float64).index_add_(0, assign, counts.double())
    cluster_rank = torch.empty(num_clusters, dtype=torch.int64)
    cluster_rank[torch.argsort(cluster_total, descending=True, stable=True)] = torch.arange(num_clusters)
    # Sort by (cluster rank, count descending, old id).
    order = torch.argsort(-counts, stable=True)
    order = order[torch.argsort(cluster_rank[assign][order], stable=True)]
    mapping = torch.empty_like(order)
    mapping[order] = torch.arange(num_rows)
    return mapping


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global RNG (``svd_lowrank`` has no generator argument) and restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FeatureRenumbering(nn.Module):
    """Maps the ids of some features of a ``KeyedJaggedTensor`` through one table.

    The mapping is a persistent buffer (``<prefix>.mapping`` in the ``state_dict``),
    so a trained model keeps taking raw ids.

    Args:
        num_rows (int): size of the id space.
        feature_names (Sequence[str]): features whose values are renumbered.
        mapping (Optional[Tensor]): ``(num_rows,)`` old -> new ids; identity if omitted.

    Example::

        renumber = FeatureRenumbering(4, ["history"], frequency_renumbering(torch.tensor([1, 5, 0, 5])))
        kjt = KeyedJaggedTensor.from_lengths_sync(["history"], torch.tensor([1, 3]), torch.tensor([2]))
        renumber(kjt).values()  # tensor([0, 1])
    """

    def __init__(self, num_rows: int, feature_names: Sequence[str], mapping: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.feature_names: List[str] = list(feature_names)
        self.register_buffer("mapping", torch.arange(num_rows, dtype=torch.int64))
        if mapping is not None:
            self.set_mapping(mapping)

    @torch.no_grad()
    def set_mapping(self, mapping: torch.Tensor) -> None:
        """Install a new ``(num_rows,)`` permutation."""
        if mapping.shape != self.mapping.shape:
            raise ValueError(
                f"FeatureRenumbering: mapping has shape {tuple(mapping.shape)}, expected {tuple(self.mapping.shape)}"
            )
        if not torch.equal(torch.sort(mapping.cpu()).values, torch.arange(mapping.numel())):
            raise ValueError("FeatureRenumbering: mapping must be a permutation of 0..num_rows-1")
        self.mapping.copy_(mapping)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        values = features.values()
        if all(k in self.feature_names for k in keys):
            new_values = self.mapping[values].to(values.dtype)
        else:
            new_values = values.clone()
            bounds = features.offset_per_key()
            for i, key in enumerate(keys):
                if key in self.feature_names:
                    part = values[bounds[i] : bounds[i + 1]]
                    new_values[bounds[i] : bounds[i + 1]] = self.mapping[part].to(values.dtype)
        return KeyedJaggedTensor(
            keys=keys,
            values=new_values,
            weights=features.weights_or_none(),
            lengths=features.lengths(),
            stride=features.stride(),
        )


@dataclass(frozen=True)
class LookupStats:
    """Mean per-batch statistics of a table's lookups (see :class:`torchrec_tt.OpCounts`).

    Attributes:
        pooling_factor: P, ids per bag.
        groups_per_bag: P_G, distinct TT groups per bag.
        distinct_groups: U, distinct groups per batch.
        tt_flops / grt_flops: forward FLOPs per batch of the two variants.
        tt_backward_flops / grt_backward_flops: backward FLOPs per batch.
        cache_hit_rate: share of the lookups served by a hot-row cache (``cache_ids``); the
            fields above then describe the TT part only (P counts the misses).
        cache_flops / cache_backward_flops: forward and backward FLOPs per batch of serving the
            hits (the same for both variants).
    """

    pooling_factor: float
    groups_per_bag: float
    distinct_groups: float
    tt_flops: float
    grt_flops: float
    tt_backward_flops: float = 0.0
    grt_backward_flops: float = 0.0
    cache_hit_rate: float = 0.0
    cache_flops: float = 0.0
    cache_backward_flops: float = 0.0


def group_stats(
    config: TTEmbeddingBagConfig,
    batches: Iterable[torch.Tensor],
    mapping: Optional[torch.Tensor] = None,
    cache_ids: Optional[torch.Tensor] = None,
) -> LookupStats:
    """P, P_G and FLOPs of a table over batches, optionally after renumbering.

    Args:
        config (TTEmbeddingBagConfig): the table (its ``tt_p_shapes[-1]`` sets the groups).
        batches (Iterable[Tuple[Tensor, Tensor]]): ``(indices, offsets)`` pairs of raw ids.
        mapping (Optional[Tensor]): old -> new ids applied before counting.
        cache_ids (Optional[Tensor]): sorted (new) ids of cached rows: hits leave the TT part.
    """
    totals = [0.0] * 10
    bags = 0
    num_batches = 0
    for indices, offsets in batches:
        if mapping is not None:
            indices = mapping[indices]
        c = count_ops(config, indices, offsets, cache_ids=cache_ids)
        fields = (c.num_lookups, c.num_segments, c.num_distinct_groups, c.tt_flops, c.grt_flops,
                  c.tt_backward_flops, c.grt_backward_flops, c.num_cache_hits, c.cache_flops, c.cache_backward_flops)
        for k, v in enumerate(fields):
            totals[k] += v
        bags += c.batch_size
        num_batches += 1
    if bags == 0:
        raise ValueError("group_stats: no bags")
    return LookupStats(
        pooling_factor=totals[0] / bags,
        groups_per_bag=totals[1] / bags,
        distinct_groups=totals[2] / num_batches,
        tt_flops=totals[3] / num_batches,
        grt_flops=totals[4] / num_batches,
        tt_backward_flops=totals[5] / num_batches,
        grt_backward_flops=totals[6] / num_batches,
        cache_hit_rate=totals[7] / max(totals[0] + totals[7], 1.0),
        cache_flops=totals[8] / num_batches,
        cache_backward_flops=totals[9] / num_batches,
    )
