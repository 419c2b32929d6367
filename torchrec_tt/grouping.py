"""TT index decomposition and (bag, group) grouping: the one Python implementation.

Used by the pure-PyTorch kernels, :func:`torchrec_tt.count_ops`, the planner and the
benchmarks. The C++/CUDA ops implement the same contract (``torchrec_tt::group_plan``).
"""

from typing import Dict, List, NamedTuple, Sequence

import torch


def decompose_indices(indices: torch.Tensor, p_shapes: Sequence[int]) -> List[torch.Tensor]:
    """Mixed-radix digits of row ids, most significant first.

    Args:
        indices (Tensor): ``(L,)`` row ids, ``0 <= i < prod(p_shapes)``.
        p_shapes (Sequence[int]): the radices ``m_0 … m_{d-1}``.

    Returns:
        ``d`` int64 tensors of shape ``(L,)``.
    """
    rest = indices.to(torch.int64)
    digits = []
    for m in reversed(p_shapes[1:]):
        digits.append(rest % m)
        rest = torch.div(rest, m, rounding_mode="floor")
    digits.append(rest)
    return digits[::-1]


def bag_ids(offsets: torch.Tensor, num_lookups: int) -> torch.Tensor:
    """``(L,)`` int64 bag id of every lookup, from ``(B + 1,)`` offsets."""
    lengths = offsets[1:].to(torch.int64) - offsets[:-1].to(torch.int64)
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=num_lookups
    )


class GroupPlan(NamedTuple):
    """Distinct (bag, group) segments and distinct groups ("slots") of a batch.

    Segments are ordered by (bag, group); slots by group. All tensors are int64.
    """

    lookup_segment: torch.Tensor  # (L,) segment of every lookup
    segment_bag: torch.Tensor  # (S,)
    segment_group: torch.Tensor  # (S,)
    segment_slot: torch.Tensor  # (S,) slot of every segment's group
    slot_group: torch.Tensor  # (U,)

    @property
    def num_segments(self) -> int:
        return self.segment_bag.numel()

    @property
    def num_slots(self) -> int:
        return self.slot_group.numel()


# Fields of the packed plan returned by ``torch.ops.torchrec_tt.group_plan``, in order, with their
# sizes in terms of (L = lookups, B = bags). Mirrors csrc/include/torchrec_tt/plan_layout.h.
PLAN_HEADER_SIZE = 8
PLAN_FIELDS = (
    ("lookup_segment", 1, 0, 0),  # (name, L multiplier, B multiplier, constant)
    ("sorted_lookup", 1, 0, 0),
    ("sorted_last", 1, 0, 0),
    ("segment_start", 1, 0, 1),
    ("segment_bag", 1, 0, 0),
    ("segment_group", 1, 0, 0),
    ("segment_slot", 1, 0, 0),
    ("bag_segment_start", 0, 1, 1),
    ("slot_group", 1, 0, 0),
    ("slot_segment_start", 1, 0, 1),
    ("slot_segment", 1, 0, 0),
    ("bag_hits", 0, 1, 0),
)


def plan_numel(num_lookups: int, batch_size: int) -> int:
    """Entries of the packed plan of a batch (works with SymInts)."""
    return PLAN_HEADER_SIZE + sum(a * num_lookups + b * batch_size + c for _, a, b, c in PLAN_FIELDS)


def unpack_plan(plan: torch.Tensor, num_lookups: int, batch_size: int) -> Dict[str, torch.Tensor]:
    """Views of the fields of a packed plan (untrimmed: segment and slot fields hold L entries)."""
    fields = {"header": plan[:PLAN_HEADER_SIZE]}
    at = PLAN_HEADER_SIZE
    for name, a, b, c in PLAN_FIELDS:
        size = a * num_lookups + b * batch_size + c
        fields[name] = plan[at : at + size]
        at += size
    return fields


def group_plan_python(indices: torch.Tensor, offsets: torch.Tensor, last_rows: int) -> GroupPlan:
    """Pure-PyTorch grouping of a batch; row ``i`` belongs to group ``i // last_rows``.

    Args:
        indices (Tensor): ``(L,)`` row ids.
        offsets (Tensor): ``(B + 1,)`` bag boundaries.
        last_rows (int): rows of the last core, ``m_{d-1}``.
    """
    num_lookups = indices.numel()
    group = torch.div(indices.to(torch.int64), last_rows, rounding_mode="floor")
    stride = int(group.max()) + 1 if num_lookups else 1
    keys, lookup_segment = torch.unique(
        bag_ids(offsets, num_lookups) * stride + group, sorted=True, return_inverse=True
    )
    segment_group = keys % stride
    slot_group, segment_slot = torch.unique(segment_group, sorted=True, return_inverse=True)
    return GroupPlan(
        lookup_segment=lookup_segment.reshape(-1),
        segment_bag=torch.div(keys, stride, rounding_mode="floor"),
        segment_group=segment_group,
        segment_slot=segment_slot.reshape(-1),
        slot_group=slot_group,
    )
