"""Hot-row cache of a TT table: the lookup split and the population arithmetic (one place).

A table with ``cache_rows = K > 0`` keeps ``K`` rows uncompressed in a ``(K, N)`` block
(``cache_weight``) with their sorted ids (``cache_ids``); lookups of those rows read the
block, the others run the TT op. See docs/design.md, section 10.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from torchrec_tt import _python_ops
from torchrec_tt._python_ops import prefix_products
from torchrec_tt.enums import PoolingMode, Variant
from torchrec_tt.grouping import bag_ids, decompose_indices
from torchrec_tt.ops import fuses_cache, tt_embedding_bag

EVICTION_POLICIES = ("write_back", "drop", "raise")


_INT64_MAX = torch.iinfo(torch.int64).max


def empty_cache_ids(cache_rows: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``(K,)`` sentinel ids of empty slots: the ``K`` largest int64 values (sorted after every
    row id and never equal to a looked-up id, valid or not: a bad id still reaches the TT op's
    checks)."""
    return torch.arange(cache_rows, dtype=torch.int64, device=device) + (_INT64_MAX - cache_rows + 1)


# Up to this many table rows per looked-up id, cache_hits maps ids to slots through a temporary
# (num_rows,) table (one gather per id) instead of a binary search per id. The compiled CPU kernels'
# hit test follows the same rule (csrc/include/torchrec_tt/cpu_group_plan.h, kRowMapRowsPerLookup).
_SLOT_MAP_ROWS_PER_LOOKUP = 16


def cache_hits(
    cache_ids: torch.Tensor, indices: torch.Tensor, num_rows: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(hit, slot)``: ``(L,)`` bool, whether each id is cached, and its ``(L,)`` cache slot
    (some slot in ``[0, K)`` for misses). No host sync.

    With ``num_rows`` (the table's rows) and a batch of at least ``num_rows / 16`` ids, the ids
    go through a temporary slot map of the table's rows (its size is bounded by the batch's, and
    it is freed after the call: nothing per row is stored); otherwise ``searchsorted``.
    """
    ids = indices.to(torch.int64)
    k = cache_ids.numel()
    if num_rows is not None and 0 < num_rows <= _SLOT_MAP_ROWS_PER_LOOKUP * ids.numel():
        # Empty slots' sentinels go to k extra rows (distinct targets: a deterministic scatter);
        # ids are clamped into [0, num_rows) so that a bad id reads some slot, fails the equality
        # below and reaches the op's checks.
        positions = torch.arange(k, device=ids.device)
        rows = torch.where(cache_ids < num_rows, cache_ids, num_rows + positions)
        slot_of = torch.full((num_rows + k,), k - 1, dtype=torch.int64, device=ids.device)
        slot = slot_of.scatter_(0, rows, positions)[ids.clamp(0, num_rows - 1)]
    else:
        slot = torch.searchsorted(cache_ids, ids).clamp_(max=k - 1)
    return cache_ids[slot] == ids, slot


def split_misses(
    hit: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    compact: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The TT part of a batch: ``(ids, offsets, weights)`` of the misses, in bag order.

    ``compact=True``: only the misses (``B + 1`` offsets); boolean masks, whose sizes the host
    reads. ``compact=False``: a stable misses-first permutation of all ``L`` lookups, the hits
    forming one trailing bag of row-0 lookups (``B + 2`` offsets; the caller drops that bag's
    output row), so every size depends only on ``L`` and ``B`` (no host sync).
    """
    num_lookups = indices.numel()
    miss = (~hit).to(torch.int64)
    misses_through = torch.cumsum(miss, 0)
    # Misses per bag: the running count at the bag boundaries (offsets are non-decreasing).
    bounds = torch.cat([miss.new_zeros(1), misses_through])[offsets.to(torch.int64)]
    if compact:
        keep = ~hit
        weights = per_sample_weights[keep] if per_sample_weights is not None else None
        return indices[keep], bounds.to(indices.dtype), weights
    # A miss goes to (misses before it), a hit to (all misses + hits before it); ``order``
    # is the inverse of that placement.
    num_misses = misses_through[-1:] if num_lookups else miss.new_zeros(1)
    arange = torch.arange(num_lookups, device=hit.device)
    position = torch.where(hit, num_misses + arange - misses_through, misses_through - 1)
    order = torch.empty_like(position).scatter_(0, position, arange)
    ids = torch.where(hit, torch.zeros_like(indices), indices)[order]
    weights = per_sample_weights[order] if per_sample_weights is not None else None
    bounds = torch.cat([bounds, bounds.new_full((1,), num_lookups)])
    return ids, bounds.to(indices.dtype), weights


def pooled_rows(
    rows: torch.Tensor,
    slots: torch.Tensor,
    bags: torch.Tensor,
    batch: int,
    weights: Optional[torch.Tensor],
) -> torch.Tensor:
    """``(batch, N)``: bag ``b`` sums ``weights[j] * rows[slots[j]]`` over the lookups ``j`` with
    ``bags[j] == b`` (differentiable).

    ``index_select`` then ``index_add``, whose backward passes are ``index_add`` and
    ``index_select``: no sort, and no host sync on CUDA (``F.embedding_bag``'s CUDA backward
    reads a segment count on the host, its CPU backward sorts the ids).
    """
    picked = rows.index_select(0, slots)
    if weights is not None:
        picked = picked * weights.unsqueeze(1).to(picked.dtype)
    return picked.new_zeros(batch, rows.shape[1]).index_add(0, bags, picked)


def cached_tt_embedding_bag(
    cores: Sequence[torch.Tensor],
    cache_weight: torch.Tensor,
    cache_ids: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    pooling: PoolingMode,
    variant: Variant,
    compact: Optional[bool] = None,
    num_rows: Optional[int] = None,
) -> torch.Tensor:
    """Pooled lookups of a TT table with a hot-row cache (differentiable).

    Args:
        cores (Sequence[Tensor]): the TT cores (compute dtype).
        cache_weight (Tensor): ``(K, N)`` cached rows (compute dtype).
        cache_ids (Tensor): ``(K,)`` sorted int64 ids of the cached rows.
        indices (Tensor): ``(L,)`` ids; offsets (Tensor): ``(B + 1,)``.
        per_sample_weights (Optional[Tensor]): ``(L,)``.
        pooling (PoolingMode): sum or mean (the bag's full length divides).
        variant (Variant): the TT part's variant.
        compact (Optional[bool]): where the compiled kernels do not serve hits themselves (CUDA,
            the pure-PyTorch path), how the hits are split off: ``True``, the TT op sees only the
            misses and the cache only the hits (reads the miss count on the host); ``False``, the
            trailing bag and a zero row (sync-free). Default: ``None``, the compiled CPU kernels
            serve the hits (one op, docs/design.md section 10), else ``True`` on CPU, uncompiled
            (a read is free there), ``False`` on CUDA and in traced graphs. Tests pass a value to
            run a split on CPU.
        num_rows (Optional[int]): the table's rows (``num_embeddings``), for the hit test
            (:func:`cache_hits`).

    Returns:
        Tensor: ``(B, N)``.
    """
    if compact is None and fuses_cache(indices.device):
        return tt_embedding_bag(cores, indices, offsets, per_sample_weights, pooling, variant,
                                cache_weight=cache_weight, cache_ids=cache_ids)
    if offsets.dtype != indices.dtype:
        offsets = offsets.to(indices.dtype)
    batch, cache_size = offsets.numel() - 1, cache_weight.shape[0]
    if compact is None:
        compact = indices.device.type == "cpu" and not _python_ops.is_tracing(indices)
    hit, slot = cache_hits(cache_ids, indices, num_rows)
    ids, tt_offsets, tt_weights = split_misses(hit, indices, offsets, per_sample_weights, compact)
    tt_part = tt_embedding_bag(cores, ids, tt_offsets, tt_weights, pooling=PoolingMode.SUM, variant=variant)
    if compact:  # the cache reads only the hits (in bag order)
        hit_bags = bag_ids(offsets - tt_offsets, int(hit.sum()))
        weights = per_sample_weights[hit] if per_sample_weights is not None else None
        cached_part = pooled_rows(cache_weight, slot[hit], hit_bags, batch, weights)
    else:
        tt_part = tt_part[:batch]
        # Misses read an appended zero row: no per-lookup mask (and no weights when none are given).
        rows = torch.cat([cache_weight, cache_weight.new_zeros(1, cache_weight.shape[1])])
        slots = torch.where(hit, slot, torch.full_like(slot, cache_size))
        cached_part = pooled_rows(rows, slots, bag_ids(offsets, indices.numel()), batch, per_sample_weights)
    pooled = tt_part + cached_part
    if pooling == PoolingMode.MEAN:
        lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).to(pooled.dtype)
        pooled = pooled / lengths.unsqueeze(1)
    return pooled


def tt_rows(cores: Sequence[torch.Tensor], ids: torch.Tensor, p_shapes: Sequence[int]) -> torch.Tensor:
    """``(E, N)`` TT rows ``ids`` (no grad)."""
    with torch.no_grad():
        if ids.numel() == 0:
            return cores[0].new_zeros(0, int(torch.Size([c.shape[2] for c in cores]).numel()))
        return prefix_products(list(cores), decompose_indices(ids, p_shapes)).reshape(ids.numel(), -1)


def top_rows(counts: torch.Tensor, cache_rows: int) -> torch.Tensor:
    """Sorted ids of the ``cache_rows`` most counted rows among those counted at least once."""
    k = min(cache_rows, counts.numel())
    values, ids = torch.topk(counts, k)
    return torch.sort(ids[values > 0]).values


@dataclass
class CacheUpdate:
    """What :meth:`~torchrec_tt.TTEmbeddingBag.populate_cache` changed in one table.

    Attributes:
        admitted (Tensor): ``(A,)`` ids newly cached (start at their TT value).
        evicted (Tensor): ``(E,)`` ids that left the cache.
        evicted_values (Tensor): ``(E, N)`` their cached values when they left.
        residual (Optional[Tensor]): ``(E,)`` relative error of their TT rows after write-back
            (``on_evict="write_back"``), else ``None``.
        policy (str): the eviction policy applied.
    """

    admitted: torch.Tensor
    evicted: torch.Tensor
    evicted_values: torch.Tensor
    residual: Optional[torch.Tensor]
    policy: str


def write_back_last_core(
    cores: List[torch.Tensor],
    ids: torch.Tensor,
    values: torch.Tensor,
    p_shapes: Sequence[int],
    q_shapes: Sequence[int],
    damping: float = 1e-3,
) -> torch.Tensor:
    """Refit the last core's slices used by rows ``ids`` so those rows approach ``values``.

    Row ``i`` is ``reshape(P(i) @ G_d[i_d])`` with the prefix product ``P(i)``, ``(n_pre, R)``
    (fixed here), and the slice ``G_d[i_d]``, ``(R, n_d)``. Each touched slice ``j`` is set to
    the damped least-squares solution over the evicted rows with last digit ``j``:
    ``argmin sum_i |P(i) G - V_i|^2 + damping * |P|^2/R * |G - G_j|^2`` (the damping keeps the
    slice near its value when few rows constrain it). Modifies ``cores[-1]`` in place.

    Args:
        cores (List[Tensor]): the cores, core ``k`` ``(m_k, R[k], n_k, R[k+1])``.
        ids (Tensor): ``(E,)`` rows; values (Tensor): ``(E, N)`` their target values.

    Returns:
        Tensor: ``(E,)`` relative residual ``|TT row - value| / |value|`` after the fit.
    """
    digits = decompose_indices(ids, p_shapes)
    last = cores[-1]  # (m_d, R, n_d, 1)
    rank, n_last = last.shape[1], last.shape[2]
    with torch.no_grad():
        prefix = prefix_products(cores[:-1], digits[:-1])  # (E, n_pre, R)
    values = values.to(prefix.dtype)
    target = values.reshape(ids.numel(), -1, n_last)  # (E, n_pre, n_d)
    with torch.no_grad():
        for j in torch.unique(digits[-1]).tolist():
            sel = digits[-1] == j
            p = prefix[sel].reshape(-1, rank)  # rows of every evicted row with this digit
            v = target[sel].reshape(-1, n_last)
            g0 = last[j, :, :, 0].to(p.dtype)
            lam = damping * float((p * p).sum()) / max(rank, 1) + 1e-12
            gram = p.T @ p + lam * torch.eye(rank, dtype=p.dtype, device=p.device)
            g = torch.linalg.solve(gram, p.T @ v + lam * g0)
            last[j, :, :, 0] = g.to(last.dtype)
        rows = torch.einsum("epr,ern->epn", prefix, last[digits[-1], :, :, 0].to(prefix.dtype)).reshape(ids.numel(), -1)
    return (rows - values).norm(dim=1) / values.norm(dim=1).clamp(min=1e-12)
