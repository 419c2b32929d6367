"""The compiled CPU kernels' hot-row cache (docs/design.md, section 10): ``group_plan`` with
``cache_ids`` puts each bag's cached lookups in one cache segment, and ``tt_embedding_bag`` serves
them from ``cache_weight``. Checked against the materialized table with the cached rows replaced,
``gradcheck`` in float64, the plan's fields, ``opcheck`` and the errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_tt.cache import empty_cache_ids
from torchrec_tt.enums import PoolingMode, Variant
from torchrec_tt.grouping import unpack_plan
from torchrec_tt.ops import fuses_cache, tt_embedding_bag
from tt_testing import assert_message, embedding_bag_ref, grads_or_zeros, problems, random_cores, tolerances

pytestmark = pytest.mark.skipif(
    not fuses_cache(torch.device("cpu")), reason="the C++ extension is not built: no compiled CPU kernels"
)

_KERNEL_CACHE_GROUP = -1  # plan_layout.h kCacheGroup


def _ops():
    return torch.ops.torchrec_tt


def _cache(num_rows: int, pool, generator: torch.Generator, empty: int, dim: int, dtype=torch.float64):
    """``(cache_weight, cache_ids)``: some rows of ``pool`` (the rows the problem reuses, so there are
    hits), some other rows, and ``empty`` empty slots."""
    ids = sorted(set(pool[: max(1, len(pool) // 2)]) | {num_rows - 1})
    cache_ids = torch.cat([torch.tensor(ids, dtype=torch.int64), empty_cache_ids(empty)])
    weight = torch.randn(cache_ids.numel(), dim, generator=generator, dtype=dtype)
    return weight, cache_ids


@settings(deadline=None, max_examples=40)
@given(
    problem=problems(max_batch=6, max_len=9),
    variant=st.sampled_from([Variant.GRT, Variant.TT]),
    pooling=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    empty=st.integers(0, 3),
)
def test_cached_op_matches_the_reference_and_its_gradients(problem, variant, pooling, weighted, index_dtype, empty):
    cores, indices, offsets, psw = problem.tensors(index_dtype=index_dtype, weighted=weighted)
    cores = [c.requires_grad_(True) for c in cores]
    psw = psw.requires_grad_(True) if weighted else None
    gen = torch.Generator().manual_seed(problem.seed)
    rows, dim = problem.num_rows, problem.dim
    pool = sorted(set(problem.indices)) or [0]
    cache_weight, cache_ids = _cache(rows, pool, gen, empty, dim)
    cache_weight.requires_grad_(True)

    out = tt_embedding_bag(cores, indices, offsets, psw, pooling, variant, cache_weight=cache_weight, cache_ids=cache_ids)
    ref = embedding_bag_ref(cores, indices, offsets, psw, pooling, cache=(cache_weight, cache_ids))
    torch.testing.assert_close(out, ref, **tolerances(torch.float64))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    inputs = [*cores, cache_weight, *([psw] if weighted else [])]
    for got, want in zip(grads_or_zeros(out, inputs, grad), grads_or_zeros(ref, inputs, grad)):
        torch.testing.assert_close(got, want, **tolerances(torch.float64))


@pytest.mark.parametrize("variant", ["grt", "tt"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("num_rows_per_lookup", [1, 100], ids=["slot_map", "binary_search"])
def test_cached_op_gradcheck(variant, pooling, num_rows_per_lookup):
    """float64 gradcheck of cores, cached rows and weights; both hit tests (the slot map of a small
    table, the binary search of a large one)."""
    gen = torch.Generator().manual_seed(1)
    p = [4, 3, 5] if num_rows_per_lookup == 1 else [40, 30, 50]
    cores = [c.requires_grad_(True) for c in random_cores(p, [2, 1, 2], [3, 2], generator=gen)]
    rows = math.prod(p)
    indices = torch.tensor([0, 7, 7, 59, 3, 22, rows - 1, 8, 9, 7, 0, 40], dtype=torch.int64) % rows
    offsets = torch.tensor([0, 4, 4, 9, 12])
    cache_ids = torch.cat([torch.tensor([0, 7, 22, rows - 1]), empty_cache_ids(2)])
    cache_weight = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    psw = torch.rand(12, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(*args):
        *cs, cw, w = args
        return tt_embedding_bag(list(cs), indices, offsets, w, pooling, variant, cache_weight=cw, cache_ids=cache_ids)

    assert torch.autograd.gradcheck(f, (*cores, cache_weight, psw))


def test_plan_puts_cached_lookups_in_one_trailing_segment_per_bag():
    indices = torch.tensor([5, 12, 13, 3, 12, 4, 30, 31, 5, 0], dtype=torch.int64)
    offsets = torch.tensor([0, 5, 5, 8, 10])
    last_rows = 4  # groups: id // 4
    cache_ids = torch.tensor([5, 12, 31, 100])  # 100: not a row of this batch
    plan = _ops().group_plan(indices, offsets, last_rows, 40, cache_ids)
    f = unpack_plan(plan, indices.numel(), offsets.numel() - 1)
    num_segments, num_slots, _, _, _, cache_rows, num_hits = f["header"][:7].tolist()
    assert (cache_rows, num_hits) == (4, 5)
    seg_start, seg_group = f["segment_start"][: num_segments + 1], f["segment_group"][:num_segments]
    bag_seg = f["bag_segment_start"].tolist()
    # Bag 0: 5 (cached), 12 (cached), 13 -> group 3, 3 -> group 0, 12 (cached)
    bag0 = seg_group[bag_seg[0]:bag_seg[1]].tolist()
    assert bag0 == [0, 3, _KERNEL_CACHE_GROUP]
    s = bag_seg[1] - 1
    lookups = f["sorted_lookup"][seg_start[s]:seg_start[s + 1]].tolist()
    slots = f["sorted_last"][seg_start[s]:seg_start[s + 1]].tolist()
    assert lookups == [0, 1, 4] and slots == [0, 1, 1]
    assert bag_seg[1] == bag_seg[2]  # empty bag
    assert seg_group[bag_seg[2]:bag_seg[3]].tolist() == [1, 7, _KERNEL_CACHE_GROUP]  # 4; 30; 31 cached
    assert seg_group[bag_seg[3]:bag_seg[4]].tolist() == [0, _KERNEL_CACHE_GROUP]  # 0; 5 cached
    # Each bag's cache segment size: its last sorted lookups, ending at the bag's offset.
    assert f["bag_hits"].tolist() == [3, 0, 1, 1]
    assert seg_start[s + 1] == offsets[1] and seg_start[s] == offsets[1] - 3
    # Slots are the uncached groups only, and their lists hold no cache segment.
    assert f["slot_group"][:num_slots].tolist() == [0, 1, 3, 7]
    listed = f["slot_segment"][: f["slot_segment_start"][num_slots]].tolist()
    assert sorted(listed) == [s for s in range(num_segments) if seg_group[s] != _KERNEL_CACHE_GROUP]


@pytest.mark.parametrize("variant", [int(Variant.GRT), int(Variant.TT)], ids=["grt", "tt"])
def test_opcheck_with_a_cache(variant):
    gen = torch.Generator().manual_seed(2)
    cores = [c.requires_grad_(True) for c in random_cores([3, 4, 2], [2, 1, 2], [2, 3], generator=gen)]
    indices, offsets = torch.tensor([0, 5, 5, 23, 4, 11]), torch.tensor([0, 3, 3, 6])
    cache_ids = torch.cat([torch.tensor([5, 11]), empty_cache_ids(1)])
    cache_weight = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    args = (cores, indices, offsets, None, int(PoolingMode.MEAN), variant)
    torch.library.opcheck(_ops().tt_embedding_bag.default, (*args, None, cache_weight, cache_ids))
    grad_output = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    torch.library.opcheck(
        _ops().tt_embedding_bag_backward.default,
        (grad_output, cores, indices, offsets, None, int(PoolingMode.SUM), variant, False, None,
         cache_weight.detach(), cache_ids),
    )


def _bad_call(**change):
    gen = torch.Generator().manual_seed(3)
    cores = random_cores([3, 4], [2, 2], [2], generator=gen)
    args = dict(indices=torch.tensor([0, 5, 11]), offsets=torch.tensor([0, 2, 3]),
                cache_weight=torch.randn(2, 4, dtype=torch.float64), cache_ids=torch.tensor([5, 11]))
    args.update(change)
    return lambda: _ops().tt_embedding_bag(cores, args["indices"], args["offsets"], None, 0, int(Variant.GRT), None,
                                           args["cache_weight"], args["cache_ids"])


@pytest.mark.parametrize(
    "change, patterns",
    [
        (dict(cache_ids=torch.tensor([11, 5])), ["cache_ids must be distinct and ascending", r"cache_ids\[1\] = 5"]),
        (dict(cache_ids=torch.tensor([5, 5])), ["distinct and ascending"]),
        (dict(cache_ids=torch.tensor([-1, 5])), [r"cache_ids\[0\] = -1 is negative"]),
        (dict(cache_ids=torch.tensor([5, 11], dtype=torch.int32)), ["cache_ids must be a 1-D int64 CPU tensor", "Int"]),
        (dict(cache_weight=torch.randn(3, 4, dtype=torch.float64)), [r"cache_weight must have shape \(2, 4\)", r"\[3, 4\]"]),
        (dict(cache_weight=torch.randn(2, 4)), ["cache_weight must be a CPU tensor of the cores' dtype", "Float"]),
        (dict(cache_weight=None), ["cache_weight and cache_ids go together", "cache_ids alone"]),
    ],
)
def test_bad_cache_arguments_are_named(change, patterns):
    with pytest.raises(ValueError) as excinfo:
        _bad_call(**change)()
    assert_message(excinfo, "tt_embedding_bag", *patterns)


def test_plan_built_without_the_cache_is_rejected():
    gen = torch.Generator().manual_seed(4)
    cores = random_cores([3, 4], [2, 2], [2], generator=gen)
    indices, offsets = torch.tensor([0, 5, 11]), torch.tensor([0, 2, 3])
    plan = _ops().group_plan(indices, offsets, 4)
    with pytest.raises(ValueError) as excinfo:
        _ops().tt_embedding_bag(cores, indices, offsets, None, 0, int(Variant.GRT), plan,
                                torch.randn(2, 4, dtype=torch.float64), torch.tensor([5, 11]))
    assert_message(excinfo, "plan was built for another batch or table", "cache rows 0", "cache rows 2")


def test_public_op_routes_a_cache_and_checks_its_pair():
    gen = torch.Generator().manual_seed(5)
    cores = random_cores([3, 4], [2, 2], [2], generator=gen)
    with pytest.raises(ValueError) as excinfo:
        tt_embedding_bag(cores, torch.tensor([1]), torch.tensor([0, 1]), cache_ids=torch.tensor([1]))
    assert_message(excinfo, "cache_weight and cache_ids go together", "cache_ids alone")


@pytest.mark.parametrize("q_shapes", [[2, 2, 4], [2, 3, 4], [4, 4, 4], [2, 4, 9]], ids=["N16", "N24", "N64", "N72"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cache_gradient_over_embedding_widths(q_shapes, dtype):
    """The grt backward adds each bag's output gradient into its cached rows' gradients in blocks of
    8 vectors, single vectors and a scalar tail: widths 16, 24, 64 and 72 take each of them."""
    gen = torch.Generator().manual_seed(3)
    cores = [c.to(dtype).requires_grad_() for c in random_cores([5, 6, 7], q_shapes, [3, 3], generator=gen)]
    dim = math.prod(q_shapes)
    indices = torch.randint(0, 210, (400,), generator=gen)
    offsets = torch.arange(0, 401, 8)
    cache_ids = torch.cat([torch.tensor([0, 3, 5, 17, 40, 100, 150, 209]), empty_cache_ids(2)])
    weight = torch.randn(10, dim, dtype=dtype, generator=gen, requires_grad=True)
    psw = torch.rand(400, dtype=dtype, generator=gen, requires_grad=True)
    out = tt_embedding_bag(cores, indices, offsets, psw, "sum", "grt", cache_weight=weight, cache_ids=cache_ids)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_weight = weight.detach().clone().requires_grad_()
    ref_psw = psw.detach().clone().requires_grad_()
    ref = embedding_bag_ref([c.detach() for c in cores], indices, offsets, ref_psw, "sum", cache=(ref_weight, cache_ids))
    ref.backward(grad)
    tol = tolerances(torch.float64) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    assert ref_weight.grad[:8].abs().sum() > 0  # the cached rows are hit
    torch.testing.assert_close(weight.grad, ref_weight.grad, **tol)
    torch.testing.assert_close(psw.grad, ref_psw.grad, **tol)
