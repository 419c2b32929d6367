"""TT index decomposition, (bag, group) plans and the op counts P, P_G, U, S and FLOPs.

Plans are checked against brute-force Python sets; FLOPs against
``torch.utils.flop_counter.FlopCounterMode`` run over real chains, and the paper's
numbers (GRT-GnR Figure 2, DESIGN §1 table).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from torchrec_tt import PoolingMode, TTEmbeddingBagConfig, Variant, chain_flops, count_ops, expected_groups_per_bag
from torchrec_tt import _python_ops
from torchrec_tt.grouping import decompose_indices, group_plan_python, unpack_plan
from torchrec_tt.ops import group_plan, uses_extension
from tt_testing import DEVICES, problems, random_cores

PAPER = dict(num_embeddings=23100, embedding_dim=64, tt_p_shapes=[21, 22, 50], tt_q_shapes=[4, 4, 4], tt_ranks=[32, 32])


def _config(problem, name="t"):
    return TTEmbeddingBagConfig(
        name=name,
        num_embeddings=problem.num_rows,
        embedding_dim=problem.dim,
        feature_names=["f"],
        tt_p_shapes=list(problem.p_shapes),
        tt_q_shapes=list(problem.q_shapes),
        tt_ranks=list(problem.ranks),
    )


def _bags(problem):
    bags, start = [], 0
    for length in problem.lengths:
        bags.append(problem.indices[start : start + length])
        start += length
    return bags


@settings(deadline=None, max_examples=30)
@given(p=st.lists(st.integers(1, 7), min_size=2, max_size=4), data=st.data())
def test_decompose_indices_is_mixed_radix(p, data):
    rows = data.draw(st.lists(st.integers(0, math.prod(p) - 1), min_size=0, max_size=20))
    digits = decompose_indices(torch.tensor(rows, dtype=torch.int32), p)
    assert len(digits) == len(p)
    for j, row in enumerate(rows):
        got = [int(d[j]) for d in digits]
        assert all(0 <= g < m for g, m in zip(got, p))
        # i = ((i_0 m_1 + i_1) m_2 + i_2) ...
        value = 0
        for g, m in zip(got, p):
            value = value * m + g
        assert value == row


def _check_plan(plan, problem, last_rows):
    bags = _bags(problem)
    pairs = sorted({(b, i // last_rows) for b, bag in enumerate(bags) for i in bag})
    groups = sorted({i // last_rows for i in problem.indices})
    assert [(int(b), int(g)) for b, g in zip(plan.segment_bag, plan.segment_group)] == pairs
    assert plan.slot_group.tolist() == groups
    bag_of = [b for b, bag in enumerate(bags) for _ in bag]
    assert plan.lookup_segment.numel() == len(problem.indices)
    for j, i in enumerate(problem.indices):
        s = int(plan.lookup_segment[j])
        assert (int(plan.segment_bag[s]), int(plan.segment_group[s])) == (bag_of[j], i // last_rows)
    for s in range(len(pairs)):
        assert int(plan.slot_group[plan.segment_slot[s]]) == int(plan.segment_group[s])
    for t in plan:
        assert t.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=30)
@given(problem=problems(max_batch=6, max_len=8), index_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_group_plan_matches_brute_force(problem, index_dtype, device):
    _, indices, offsets, _ = problem.tensors(index_dtype=index_dtype, device=device)
    last_rows = problem.p_shapes[-1]
    _check_plan(group_plan_python(indices, offsets, last_rows), problem, last_rows)
    # The public entry point (compiled op trimmed by its counts when the extension is built).
    _check_plan(group_plan(indices, offsets, last_rows), problem, last_rows)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_groups", [40, 2**24], ids=["32-bit keys", "64-bit keys"])
def test_group_plan_orders_short_long_and_presorted_bags(index_dtype, num_groups):
    """Bags on each side of the compiled op's rank-sort / std::sort switch (256 lookups, where the
    32-bit keys' positions end too; 192 before), bags that are already in group order, and empty ones: lookups
    ordered by (group, position) per bag. Group ids past 2^23 take 64-bit keys."""
    g = torch.Generator().manual_seed(0)
    last_rows = 7
    lengths = [0, 1, 2, 45, 95, 191, 192, 193, 256, 257, 300, 1500, 0, 40]
    bags = [torch.randint(0, num_groups * last_rows, (n,), generator=g) for n in lengths]
    bags[-1] = torch.sort(bags[-1]).values  # already grouped: the early-out path
    indices = torch.cat(bags).to(index_dtype)
    offsets = torch.tensor([0] + lengths, dtype=index_dtype).cumsum(0).to(index_dtype)
    problem = SimpleNamespace(lengths=lengths, indices=indices.tolist())
    _check_plan(group_plan(indices, offsets, last_rows), problem, last_rows)
    if uses_extension(indices.device):
        plan = torch.ops.torchrec_tt.group_plan(indices, offsets, last_rows)
        order = unpack_plan(plan, indices.numel(), len(lengths))["sorted_lookup"].tolist()
        expected = sorted(range(indices.numel()), key=lambda j: (_bag_of_lookup(offsets, j), int(indices[j]) // last_rows, j))
        assert order == expected


def test_group_plan_with_a_cache_orders_uncached_then_cached():
    """A bag of 300 lookups of which 200 are cached: 100 ranked (rank sort) and positions past 256;
    a bag of 600 with a few hits: over 256 ranked (comparison sort); a bag of hits only. Every
    bag's uncached lookups by (group, position), then its cached ones by position, and its
    segments as built here (_check_cached_plan_segments). With the table's size the plan reads
    each lookup's group, last digit and cache slot from codes of the table's rows, without
    (num_rows -1) it divides and finds each lookup's slot: the same plan. The table's last group is
    partial (281 rows of 7-row groups) and holds a cached row; the cache has an empty slot."""
    if not uses_extension(torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(1)
    last_rows, rows = 7, 281
    lengths = [300, 45, 193, 0, 3, 4, 600]
    indices = torch.randint(0, rows, (sum(lengths),), generator=g)
    indices[:300][torch.randperm(300, generator=g)[:200]] = 0  # row 0 is cached
    indices[541:545] = torch.tensor([100, 5, 100, 0])  # a bag of hits only
    indices[-3:] = torch.tensor([280, 279, 280])  # the partial group: a cached row and an uncached one
    cache_ids = torch.tensor([0, 5, 17, 100, 280, torch.iinfo(torch.int64).max])  # the last slot is empty
    offsets = torch.tensor([0] + lengths).cumsum(0)
    plan = torch.ops.torchrec_tt.group_plan(indices, offsets, last_rows, rows, cache_ids)
    assert torch.equal(plan, torch.ops.torchrec_tt.group_plan(indices, offsets, last_rows, -1, cache_ids))
    order = unpack_plan(plan, indices.numel(), len(lengths))["sorted_lookup"].tolist()
    cached = set(cache_ids.tolist())
    expected = sorted(range(indices.numel()), key=lambda j: (
        _bag_of_lookup(offsets, j), int(indices[j]) in cached, -1 if int(indices[j]) in cached else int(indices[j]) // last_rows, j))
    assert order == expected
    _check_cached_plan_segments(plan, indices, offsets, last_rows, cache_ids)


def _check_cached_plan_segments(plan, indices, offsets, last_rows, cache_ids) -> None:
    """The plan's segments against segments built here: per bag its uncached groups ascending,
    then one cache segment (group -1) holding its hits, whose sorted_last is the cache slot, and
    bag_hits its size."""
    fields = unpack_plan(plan, indices.numel(), offsets.numel() - 1)
    slot_of = {int(r): s for s, r in enumerate(cache_ids.tolist())}
    seg_bag, seg_group, seg_start, bag_seg, lookup_seg, sorted_last, bag_hits = [], [], [0], [0], {}, [], []
    for b in range(offsets.numel() - 1):
        lookups = range(int(offsets[b]), int(offsets[b + 1]))
        by_group = {}
        for j in lookups:
            row = int(indices[j])
            by_group.setdefault(-1 if row in slot_of else row // last_rows, []).append(j)
        bag_hits.append(len(by_group.get(-1, [])))
        for group in sorted(by_group, key=lambda q: (q < 0, q)):
            for j in by_group[group]:
                lookup_seg[j] = len(seg_bag)
                row = int(indices[j])
                sorted_last.append(slot_of[row] if group < 0 else row % last_rows)
            seg_bag.append(b)
            seg_group.append(group)
            seg_start.append(seg_start[-1] + len(by_group[group]))
        bag_seg.append(len(seg_bag))
    num_segments = len(seg_bag)
    segments_in_plan, _, _, _, _, cache_rows, num_hits = fields["header"][:7].tolist()
    assert (segments_in_plan, cache_rows) == (num_segments, cache_ids.numel())
    assert num_hits == sum(1 for j in range(indices.numel()) if int(indices[j]) in slot_of)
    assert fields["segment_bag"][:num_segments].tolist() == seg_bag
    assert fields["segment_group"][:num_segments].tolist() == seg_group
    assert fields["segment_start"][: num_segments + 1].tolist() == seg_start
    assert fields["bag_segment_start"].tolist() == bag_seg
    assert fields["lookup_segment"].tolist() == [lookup_seg[j] for j in range(indices.numel())]
    assert fields["sorted_last"].tolist() == sorted_last
    # A bag's hits are the last bag_hits[b] of its sorted lookups: what the backward reads.
    assert fields["bag_hits"].tolist() == bag_hits


def _bag_of_lookup(offsets: torch.Tensor, j: int) -> int:
    return int(torch.searchsorted(offsets[1:], torch.tensor(j), right=True))


def test_count_ops_figure_2():
    """GRT-GnR Figure 2: TT-indices (0,0,1), (0,1,0), (0,1,2), (0,1,3) in one bag."""
    p = [4, 4, 4]
    tt_indices = [(0, 0, 1), (0, 1, 0), (0, 1, 2), (0, 1, 3)]
    rows = [(a * p[1] + b) * p[2] + c for a, b, c in tt_indices]
    cfg = TTEmbeddingBagConfig(name="fig2", num_embeddings=64, embedding_dim=8, feature_names=["f"],
                               tt_p_shapes=p, tt_q_shapes=[2, 2, 2], tt_ranks=[4, 4])
    counts = count_ops(cfg, torch.tensor(rows), torch.tensor([0, 4]))
    assert counts.pooling_factor == 4  # P
    assert counts.groups_per_bag == 2  # P_G: groups (0,0) and (0,1)
    assert counts.num_distinct_groups == 2 and counts.num_segments == 2
    assert counts.num_lookups == 4 and counts.batch_size == 1
    # By hand: C_pre = 2*n1*r1*n2*r2 = 2*2*4*2*4 = 128, C_last = 2*(n1 n2)*r2*n3 = 2*4*4*2 = 64,
    # weighted tt reduce 2*L*N = 64. grt: group (0,0) has one row in one segment (row path:
    # D C_last = 64 and y_b += W per lookup, 2*1*8 = 16); group (0,1) has three rows in one segment
    # (segment path: S C_last = 64, intra-group reduce 2*3*r2*n3 = 48, inter-group reduce S*N = 8).
    assert counts.tt_flops == 4 * (128 + 64) + 64 == 832
    assert counts.grt_flops == 2 * 128 + (64 + 16) + (64 + 48 + 8) == 456
    assert counts.grt_no_reuse_flops == counts.grt_flops  # two segments, two groups
    assert counts.tt_backward_flops == 2 * 4 * (128 + 64) + 64 == 1600
    assert counts.grt_backward_flops == (2 * 64 + 16) + (2 * 64 + 48) + 2 * 2 * 128 == 832
    assert (counts.num_distinct_rows, counts.num_row_path_slots_rows) == (4, 1)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "q, ranks",
    [([4, 4, 4], [1, 32, 32, 1]), ([2, 3], [1, 5, 1]), ([3, 2, 2, 5], [1, 4, 3, 2, 1])],
)
def test_chain_flops_counts_a_real_chain(q, ranks):
    """chain_flops equals the FLOPs torch counts for one left-to-right chain."""
    cores = random_cores([1] * len(q), q, ranks[1:-1], dtype=torch.float32)
    prefix = [None]

    def run_prefix():
        acc = cores[0][0].reshape(q[0], ranks[1])
        for core in cores[1:-1]:
            acc = (acc @ core[0].reshape(core.size(1), -1)).reshape(-1, core.size(3))
        prefix[0] = acc

    c_pre = _flops(run_prefix)
    c_last = _flops(lambda: prefix[0] @ cores[-1][0].reshape(ranks[-2], q[-1]))
    assert chain_flops(q, ranks) == (c_pre, c_last)


def test_chain_flops_paper_table():
    """DESIGN §1, d = 3: C_pre = 2 n_1 r_1 n_2 r_2, C_last = 2 n_1 n_2 r_2 n_3."""
    (n1, n2, n3), (r1, r2) = [4, 4, 4], [32, 32]
    c_pre, c_last = 2 * n1 * r1 * n2 * r2, 2 * n1 * n2 * r2 * n3
    assert chain_flops([n1, n2, n3], [1, r1, r2, 1]) == (c_pre, c_last) == (32768, 4096)


@settings(deadline=None, max_examples=25)
@given(problem=problems(min_batch=1, max_batch=6, max_len=8))
def test_count_ops_consistency(problem):
    cfg = _config(problem)
    indices = torch.tensor(problem.indices, dtype=torch.int64)
    offsets = torch.tensor([0, *torch.tensor(problem.lengths, dtype=torch.int64).cumsum(0).tolist()])
    c = count_ops(cfg, indices, offsets)
    last = problem.p_shapes[-1]
    bags = _bags(problem)
    assert c.num_segments == sum(len({i // last for i in bag}) for bag in bags)  # S
    assert c.num_distinct_groups == len({i // last for i in problem.indices})  # U
    assert c.num_distinct_groups <= c.num_segments <= c.num_lookups == len(problem.indices)
    assert c.batch_size == problem.batch_size
    assert c.pooling_factor == pytest.approx(len(problem.indices) / problem.batch_size)
    assert c.groups_per_bag == pytest.approx(c.num_segments / problem.batch_size)
    assert c.groups_per_bag <= c.pooling_factor
    assert c.grt_flops <= c.grt_no_reuse_flops  # prefix reuse never costs more
    if c.num_distinct_groups == c.num_segments:
        assert c.grt_flops == c.grt_no_reuse_flops
    _assert_exact_flops(c, problem, bags)


def _brute_force_chain_flops(q, ranks):
    """(C_pre, C_last) by multiplying out one chain step by step: an (a x b) @ (b x c) product
    costs 2abc; the running matrix after step k is (n_0..n_k) x R[k+1]."""
    rows, flops = q[0], []
    for k in range(1, len(q)):
        flops.append(2 * rows * ranks[k] * (q[k] * ranks[k + 1]))
        rows *= q[k]
    return sum(flops[:-1]), flops[-1]


def _assert_exact_flops(c, problem, bags):
    """Every FLOP count of count_ops equals the DESIGN §1 cost model evaluated on brute-force
    sets of the batch (L lookups, S (bag, group) pairs, U distinct groups, D distinct rows), with
    the CPU kernels' choice per group (row path when its distinct rows are at most its segments)."""
    last, dim = problem.p_shapes[-1], problem.dim
    lookups = len(problem.indices)
    segments = sum(len({i // last for i in bag}) for bag in bags)
    distinct = len({i // last for i in problem.indices})
    c_pre, c_last = _brute_force_chain_flops(problem.q_shapes, problem.full_ranks)
    last_slice = problem.full_ranks[-2] * problem.q_shapes[-1]
    forward = backward = 0
    for g in {i // last for i in problem.indices}:
        seg_g = sum(1 for bag in bags if any(i // last == g for i in bag))
        rows_g = len({i for i in problem.indices if i // last == g})
        lookups_g = sum(1 for i in problem.indices if i // last == g)
        if rows_g <= seg_g:  # row path
            forward += rows_g * c_last + 2 * lookups_g * dim
            backward += 2 * rows_g * c_last + 2 * lookups_g * dim
        else:  # segment path: S += c_j G_d[i_d] (intra), y_b += Q S (inter)
            forward += seg_g * c_last + 2 * lookups_g * last_slice + seg_g * dim
            backward += 2 * seg_g * c_last + 2 * lookups_g * last_slice
    assert c.tt_flops == lookups * (c_pre + c_last) + 2 * lookups * dim
    assert c.grt_flops == distinct * c_pre + forward
    assert c.grt_no_reuse_flops == segments * c_pre + forward
    assert c.tt_backward_flops == 2 * lookups * (c_pre + c_last) + 2 * lookups * dim
    assert c.grt_backward_flops == backward + 2 * distinct * c_pre
    assert c.num_distinct_rows == len(set(problem.indices))


@settings(deadline=None, max_examples=25)
@given(
    groups=st.lists(st.integers(0, 21 * 22 - 1), min_size=1, max_size=4),
    data=st.data(),
)
def test_grt_cheaper_when_lookups_share_groups(groups, data):
    """Paper table, bags drawn from a few groups so that P_G <= P / 2: grt needs fewer FLOPs."""
    cfg = TTEmbeddingBagConfig(name="paper", feature_names=["f"], **PAPER)
    batch = data.draw(st.integers(1, 4))
    bags = []
    for _ in range(batch):
        bag_groups = data.draw(st.lists(st.sampled_from(groups), min_size=1, max_size=3))
        lasts = data.draw(st.lists(st.integers(0, 49), min_size=2 * len(bag_groups), max_size=4 * len(bag_groups)))
        bags.append([g * 50 + lasts[k] for k in range(len(lasts)) for g in [bag_groups[k % len(bag_groups)]]])
    indices = torch.tensor([i for bag in bags for i in bag])
    offsets = torch.tensor([0, *torch.tensor([len(b) for b in bags]).cumsum(0).tolist()])
    c = count_ops(cfg, indices, offsets)
    assert c.groups_per_bag <= c.pooling_factor / 2
    assert c.grt_flops < c.tt_flops
    assert c.grt_backward_flops < c.tt_backward_flops


@pytest.mark.parametrize("variant", list(Variant), ids=str)
@settings(deadline=None, max_examples=15)
@given(problem=problems(min_cores=3, min_batch=1, max_len=8))
def test_python_kernel_matmul_flops_match_counts(problem, variant):
    """The pure-PyTorch kernels do exactly the chain work count_ops predicts:
    ``tt``: L (C_pre + C_last); ``grt``: U C_pre + S C_last (one prefix per distinct group)."""
    cores, indices, offsets, _ = problem.tensors()
    c = count_ops(_config(problem), indices, offsets)
    c_pre, c_last = chain_flops(problem.q_shapes, problem.full_ranks)
    measured = _flops(lambda: _python_ops.tt_embedding_bag_python(cores, indices, offsets, None, PoolingMode.SUM, variant))
    if variant is Variant.TT:
        assert measured == c.num_lookups * (c_pre + c_last)
    else:
        assert measured == c.num_distinct_groups * c_pre + c.num_segments * c_last


@pytest.mark.parametrize("num_groups, pooling", [(1, 1.0), (1, 5.0), (10, 3.0), (400, 80.0), (30, 100.0)])
def test_expected_groups_per_bag_matches_simulation(num_groups, pooling):
    gen = torch.Generator().manual_seed(0)
    draws = torch.randint(num_groups, (4000, int(pooling)), generator=gen)
    distinct = torch.tensor([len(set(row.tolist())) for row in draws], dtype=torch.float64).mean()
    expected = expected_groups_per_bag(num_groups, pooling)
    assert expected == pytest.approx(float(distinct), rel=0.02)
    assert expected <= min(num_groups, pooling)
