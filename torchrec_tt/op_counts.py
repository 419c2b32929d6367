"""Op counts of the ``tt`` and ``grt`` variants: the one source of P, P_G and FLOPs.

Used by the tests, the benchmarks and the planner's cost estimates.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.enums import Variant, VariantLike
from torchrec_tt._python_ops import first_out_of_range
from torchrec_tt.cache import cache_hits, split_misses
from torchrec_tt.grouping import GroupPlan
from torchrec_tt.ops import group_plan


def chain_flops(q_shapes: Sequence[int], ranks: Sequence[int]) -> Tuple[int, int]:
    """FLOPs ``(C_pre, C_last)`` of one left-to-right chain.

    Step ``k`` multiplies the running ``(n_0⋯n_{k-1}) × R[k]`` matrix by a
    ``R[k] × (n_k R[k+1])`` slice: ``2 · n_0⋯n_{k-1} · R[k] · n_k · R[k+1]`` FLOPs.
    ``C_pre`` sums the steps that build the group prefix, ``C_last`` is the final step.

    Args:
        q_shapes (Sequence[int]): ``n_0 … n_{d-1}``.
        ranks (Sequence[int]): full ranks ``[1, r_1, …, r_{d-1}, 1]``.
    """
    steps = [
        2 * math.prod(q_shapes[:k]) * ranks[k] * q_shapes[k] * ranks[k + 1]
        for k in range(1, len(q_shapes))
    ]
    return sum(steps[:-1]), steps[-1]


# The CPU kernels' per-slot choice (csrc/cpu/tt_embedding_bag_cpu.cpp, kRowPathRowsPerSegment;
# docs/design.md section 3.2): a slot whose segments use at most this many distinct rows per segment
# computes each of its rows once (row path), else one product per segment (segment path).
ROW_PATH_ROWS_PER_SEGMENT = 1


@dataclass(frozen=True)
class RowPathStats:
    """The slots that take the row path: their segments, distinct rows and lookups."""

    segments: float = 0.0
    rows: float = 0.0
    lookups: float = 0.0


def expected_groups_per_bag(num_groups: int, pooling_factor: float) -> float:
    """Modelled P_G: expected distinct groups among ``P`` uniform draws from ``G`` groups."""
    if num_groups <= 1:
        return min(1.0, pooling_factor)
    return num_groups * -math.expm1(pooling_factor * math.log1p(-1.0 / num_groups))


@dataclass(frozen=True)
class OpCounts:
    """Work of one batch in one table.

    Attributes:
        batch_size: bags ``B``.
        num_lookups: ids ``L``.
        num_segments: distinct (bag, group) pairs ``S``.
        num_distinct_groups: distinct groups in the batch ``U``.
        pooling_factor: ``P = L / B``.
        groups_per_bag: ``P_G = S / B``.
        tt_flops: forward FLOPs of ``tt``: ``L (C_pre + C_last)`` + weighted reduce.
        grt_flops: forward FLOPs of ``grt`` with batch prefix reuse, ``U C_pre`` plus, per slot,
            the last step of the kernels' path: segment path ``S_u C_last`` + intra- and
            inter-group reduces, row path ``D_u C_last`` (each distinct row once) + ``2 L_u N``.
        grt_no_reuse_flops: ``grt`` without prefix reuse: ``S C_pre`` + the same last steps.
        num_distinct_rows: distinct rows ``D`` of the TT part.
        num_row_path_slots_rows: distinct rows of the slots that take the row path.
        tt_backward_flops / grt_backward_flops: backward FLOPs of the two variants.
        num_cache_hits: lookups served by the hot-row cache (not in ``num_lookups``: the fields
            above count the TT part only).
        cache_flops / cache_backward_flops: forward and backward FLOPs of serving the hits, the
            same for both variants: ``y_b += c C_s`` and ``dC_s += c g_b``, ``2 N`` per hit each
            (the row path's pooling of a lookup costs the same). A variant's whole op is its TT
            part plus these (:meth:`forward_flops`, :meth:`backward_flops`).
    """

    batch_size: int
    num_lookups: int
    num_segments: int
    num_distinct_groups: int
    pooling_factor: float
    groups_per_bag: float
    tt_flops: int
    grt_flops: int
    grt_no_reuse_flops: int
    tt_backward_flops: int
    grt_backward_flops: int
    num_cache_hits: int = 0
    num_distinct_rows: int = 0
    num_row_path_slots_rows: int = 0
    cache_flops: int = 0
    cache_backward_flops: int = 0

    @property
    def cache_hit_rate(self) -> float:
        """Share of all lookups served by the cache."""
        return self.num_cache_hits / max(self.num_cache_hits + self.num_lookups, 1)

    def forward_flops(self, variant: VariantLike) -> int:
        """Forward FLOPs of the whole op in ``variant``: its TT part and the cache's hits."""
        tt_part = self.grt_flops if Variant.parse(variant) is Variant.GRT else self.tt_flops
        return tt_part + self.cache_flops

    def backward_flops(self, variant: VariantLike) -> int:
        """Backward FLOPs of the whole op in ``variant``: its TT part and the cache's hits."""
        tt_part = self.grt_backward_flops if Variant.parse(variant) is Variant.GRT else self.tt_backward_flops
        return tt_part + self.cache_backward_flops


def op_counts_from_stats(
    config: TTEmbeddingBagConfig,
    batch_size: int,
    num_lookups: float,
    num_segments: float,
    num_distinct_groups: float,
    num_cache_hits: int = 0,
    num_distinct_rows: Optional[float] = None,
    row_path: Optional[RowPathStats] = None,
) -> OpCounts:
    """FLOPs from batch statistics (measured by :func:`count_ops` or modelled by the planner).

    ``row_path``: the measured slots of the row path; ``None`` models every slot alike, all on
    the row path when ``D <= S`` (``D``: ``num_distinct_rows``, else the expected distinct rows
    of ``L`` uniform draws).
    """
    c_pre, c_last = chain_flops(config.tt_q_shapes, config.full_ranks)
    dim = config.embedding_dim
    last_slice = config.full_ranks[-2] * config.tt_q_shapes[-1]
    if num_distinct_rows is None:
        num_distinct_rows = min(num_lookups, expected_groups_per_bag(config.num_embeddings, num_lookups))
    if row_path is None:
        on_rows = num_distinct_rows <= ROW_PATH_ROWS_PER_SEGMENT * num_segments
        row_path = RowPathStats(num_segments, num_distinct_rows, num_lookups) if on_rows else RowPathStats()
    seg_segments, seg_lookups = num_segments - row_path.segments, num_lookups - row_path.lookups
    intra = 2 * seg_lookups * last_slice  # S += c_j * G_d[i_d]
    inter = seg_segments * dim  # y_b += Q S
    # Row path: W_l = Q G_d[l] once per distinct row, y_b += c_j W_l per lookup (forward); the
    # backward sums dW_l = sum c_j g_b per lookup, then dG_d[l] += Qᵀ dW_l and dQ += dW_l G_d[l]ᵀ.
    last_step = seg_segments * c_last + intra + inter + row_path.rows * c_last + 2 * row_path.lookups * dim
    # Backward of tt: reverse chain (two products per step) plus the weighted scatter.
    tt_bwd = num_lookups * 2 * (c_pre + c_last) + 2 * num_lookups * dim
    # Backward of grt: dS = Qᵀg and dQ += g Sᵀ per segment (2 C_last), dG_d scatter (segment path),
    # the row path's, and the prefix chain reversed once per distinct group.
    grt_bwd = (seg_segments * 2 * c_last + intra + row_path.rows * 2 * c_last + 2 * row_path.lookups * dim
               + num_distinct_groups * 2 * c_pre)
    return OpCounts(
        batch_size=batch_size,
        num_lookups=int(num_lookups),
        num_segments=int(round(num_segments)),
        num_distinct_groups=int(round(num_distinct_groups)),
        pooling_factor=num_lookups / max(batch_size, 1),
        groups_per_bag=num_segments / max(batch_size, 1),
        tt_flops=int(num_lookups * (c_pre + c_last) + 2 * num_lookups * dim),
        grt_flops=int(num_distinct_groups * c_pre + last_step),
        grt_no_reuse_flops=int(num_segments * c_pre + last_step),
        tt_backward_flops=int(tt_bwd),
        grt_backward_flops=int(grt_bwd),
        num_cache_hits=int(num_cache_hits),
        num_distinct_rows=int(round(num_distinct_rows)),
        num_row_path_slots_rows=int(round(row_path.rows)),
        cache_flops=int(2 * num_cache_hits * dim),
        cache_backward_flops=int(2 * num_cache_hits * dim),
    )


def row_path_stats(plan: GroupPlan, indices: torch.Tensor, last_rows: int) -> Tuple[RowPathStats, int]:
    """The slots of ``plan`` that the CPU kernels run on the row path, and the batch's distinct
    rows ``D`` (``indices``: the plan's lookups)."""
    num_slots = plan.num_slots
    segments = torch.bincount(plan.segment_slot, minlength=num_slots)
    lookups = torch.bincount(plan.segment_slot[plan.lookup_segment], minlength=num_slots)
    rows = torch.unique(indices.to(torch.int64))
    row_counts = torch.bincount(torch.searchsorted(plan.slot_group, rows // last_rows), minlength=num_slots)
    on_rows = row_counts <= ROW_PATH_ROWS_PER_SEGMENT * segments
    stats = RowPathStats(
        float(segments[on_rows].sum()), float(row_counts[on_rows].sum()), float(lookups[on_rows].sum())
    )
    return stats, rows.numel()


def count_ops(
    config: TTEmbeddingBagConfig,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    cache_ids: Optional[torch.Tensor] = None,
) -> OpCounts:
    """P, P_G, distinct groups and forward/backward FLOPs of a batch in one table.

    Args:
        config (TTEmbeddingBagConfig): the table.
        indices (Tensor): ``(L,)`` row ids.
        offsets (Tensor): ``(B + 1,)`` bag boundaries.
        cache_ids (Optional[Tensor]): ``(K,)`` sorted ids of cached rows (a table's
            ``cache_ids``): hits are counted in ``num_cache_hits`` and every other field
            describes the TT part (the misses) only.

    Example::

        # The GRT-GnR paper's Figure 2: TT-indices (0,0,1), (0,1,0), (0,1,2), (0,1,3)
        cfg = TTEmbeddingBagConfig(name="t", num_embeddings=64, embedding_dim=8,
                                   tt_p_shapes=[4, 4, 4], tt_q_shapes=[2, 2, 2])
        c = count_ops(cfg, torch.tensor([1, 4, 6, 7]), torch.tensor([0, 4]))
        (c.pooling_factor, c.groups_per_bag)  # (4.0, 2.0)

    Raises:
        ValueError: bad ``indices``/``offsets`` (named with the table and the bad value),
            or ids outside ``[0, num_embeddings)``.
    """
    where = f"count_ops: table '{config.name}'"
    for name, t in (("indices", indices), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: {name} must be a 1-D int32 or int64 tensor, got {got}")
    if offsets.numel() == 0:
        raise ValueError(f"{where}: offsets must have B + 1 >= 1 entries, got 0")
    bad = first_out_of_range(indices, 0, config.num_embeddings)
    if bad is not None:
        raise ValueError(f"{where}: indices[{bad[0]}] must be in [0, num_embeddings={config.num_embeddings}), got {bad[1]}")
    try:
        plan = group_plan(indices, offsets, config.tt_p_shapes[-1])
    except ValueError as err:  # offsets: the op names the argument and the value
        raise ValueError(f"{where}: {err}") from None
    hits = 0
    if cache_ids is not None and cache_ids.numel() > 0:
        hit, _ = cache_hits(cache_ids.to(indices.device), indices)
        hits = int(hit.sum())
        indices, offsets, _ = split_misses(hit, indices, offsets.to(indices.dtype), None, compact=True)
        plan = group_plan(indices, offsets, config.tt_p_shapes[-1])
    row_path, num_rows = row_path_stats(plan, indices, config.tt_p_shapes[-1])
    return op_counts_from_stats(
        config,
        batch_size=offsets.numel() - 1,
        num_lookups=indices.numel(),
        num_segments=plan.num_segments,
        num_distinct_groups=plan.num_slots,
        num_cache_hits=hits,
        num_distinct_rows=num_rows,
        row_path=row_path,
    )
