"""The compiled CPU grt forward without a plan (docs/design.md, section 3.4).

When autograd does not record a call (``torch.no_grad()``, inference, cores that need no
gradient) the front-end builds no (bag, group) plan. The CPU kernel then either computes each
distinct row of the batch once and pools the bags over those rows (tables of at most 16 rows per
lookup, when that is no more work than the plan's products), or walks the lookups sorted by group,
each group on the plan-driven kernel's cheaper path. Checked against the materialized table
(``F.embedding_bag``) and the plan-driven kernel, with the path each call took read from the
profiler's phase names.
"""

import pytest
import torch
from hypothesis import given, settings

from torchrec_tt import TTEmbeddingBag, TTEmbeddingBagConfig
from torchrec_tt.cache import empty_cache_ids
from torchrec_tt.ops import tt_embedding_bag, uses_extension
from tt_testing import embedding_bag_ref, grads_or_zeros, problems, random_cores, tolerances

pytestmark = pytest.mark.skipif(
    not uses_extension(torch.device("cpu")), reason="the C++ extension is not built: no compiled CPU kernels"
)

P, Q, RANKS = [3, 4, 6], [2, 1, 2], [3, 2]  # 72 rows, groups of 6 rows (id // 6)
ROWS_PHASE, GROUPS_PHASE, SLOTS_PHASE = (
    "torchrec_tt::grt_forward::rows",
    "torchrec_tt::grt_forward::groups",
    "torchrec_tt::grt_forward::slots",
)


def _phases(fn) -> set:
    """The torchrec_tt phase names recorded while ``fn`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("torchrec_tt::")}


def _batch(generator: torch.Generator, index_dtype=torch.int64):
    lengths = [5, 0, 9, 1, 14, 0, 7] + [10] * 20  # empty bags included; rows shared across bags
    indices = torch.randint(0, 72, (sum(lengths),), generator=generator).to(index_dtype)
    indices[:4] = 13  # a row shared by several bags
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=index_dtype)
    return indices, offsets


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_grad_forward_matches_the_reference_and_the_plan_path(pooling, weighted, index_dtype, dtype):
    gen = torch.Generator().manual_seed(0)
    cores = random_cores(P, Q, RANKS, dtype=dtype, generator=gen)
    indices, offsets = _batch(gen, index_dtype)
    psw = torch.rand(indices.numel(), generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    with torch.no_grad():
        phases = _phases(lambda: tt_embedding_bag(cores, indices, offsets, psw, pooling, "grt"))
        out = tt_embedding_bag(cores, indices, offsets, psw, pooling, "grt")
        ops = torch.ops.torchrec_tt
        plan = ops.group_plan(indices, offsets, P[-1], 72, None)
        planned = ops.tt_embedding_bag(cores, indices, offsets, psw, 0 if pooling == "sum" else 1, 1, plan)
    assert ROWS_PHASE in phases and SLOTS_PHASE not in phases, phases
    ref = embedding_bag_ref([c.double() for c in cores], indices, offsets, None if psw is None else psw.double(), pooling)
    tol = tolerances(torch.float64) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(out, planned, **tol)
    assert out[1].eq(0).all() and out[5].eq(0).all()  # empty bags


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("path", [ROWS_PHASE, GROUPS_PHASE])
def test_no_grad_forward_serves_cached_rows(pooling, path):
    gen = torch.Generator().manual_seed(1)
    cores = random_cores(P, Q, RANKS, generator=gen)
    if path == ROWS_PHASE:
        indices, offsets = _batch(gen)
    else:  # 72 rows > 16 per lookup
        indices, offsets = torch.tensor([13, 40, 13, 0]), torch.tensor([0, 2, 2, 4])
    cache_ids = torch.cat([torch.tensor([0, 13, 40, 71]), empty_cache_ids(2)])
    cache_weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    psw = torch.rand(indices.numel(), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        call = lambda: tt_embedding_bag(  # noqa: E731
            cores, indices, offsets, psw, pooling, "grt", cache_weight=cache_weight, cache_ids=cache_ids
        )
        phases = _phases(call)
        out = call()
    assert path in phases, phases
    ref = embedding_bag_ref(cores, indices, offsets, psw, pooling, cache=(cache_weight, cache_ids))
    torch.testing.assert_close(out, ref, **tolerances(torch.float64))


@pytest.mark.parametrize("table", ["small", "large"])
def test_recorded_forward_builds_the_plan_and_trains(table):
    """With autograd recording, the plan is built once and saved for the backward. The forward
    itself runs the distinct-row pass where it applies (it does not need the plan) and the
    plan-driven slot pass otherwise; the gradients match the reference."""
    gen = torch.Generator().manual_seed(2)
    p = P if table == "small" else [200, 4, 6]  # 4800 rows: over 16 per lookup of this batch
    cores = [c.requires_grad_(True) for c in random_cores(p, Q, RANKS, generator=gen)]
    indices, offsets = _batch(gen)
    grad = torch.randn(offsets.numel() - 1, 4, generator=gen, dtype=torch.float64)

    def step():
        tt_embedding_bag(cores, indices, offsets, None, "mean", "grt").backward(grad)

    phases = _phases(step)
    assert "torchrec_tt::group_plan" in phases and "torchrec_tt::grt::build_plan" not in phases, phases
    assert (ROWS_PHASE in phases, SLOTS_PHASE in phases) == ((True, False) if table == "small" else (False, True))
    out = tt_embedding_bag(cores, indices, offsets, None, "mean", "grt")
    ref = embedding_bag_ref(cores, indices, offsets, None, "mean")
    torch.testing.assert_close(out, ref, **tolerances(torch.float64))
    for got, want in zip(grads_or_zeros(out, cores, grad), grads_or_zeros(ref, cores, grad)):
        torch.testing.assert_close(got, want, **tolerances(torch.float64))


def test_op_without_a_plan_still_differentiates():
    """Called directly with no plan while autograd records, the forward takes the distinct-row path
    and the backward groups the batch itself."""
    gen = torch.Generator().manual_seed(3)
    cores = [c.requires_grad_(True) for c in random_cores(P, Q, RANKS, generator=gen)]
    indices, offsets = _batch(gen)
    out = torch.ops.torchrec_tt.tt_embedding_bag(cores, indices, offsets, None, 0, 1, None)
    ref = embedding_bag_ref(cores, indices, offsets)
    torch.testing.assert_close(out, ref, **tolerances(torch.float64))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(grads_or_zeros(out, cores, grad), grads_or_zeros(ref, cores, grad)):
        torch.testing.assert_close(got, want, **tolerances(torch.float64))


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize(
    "bags",
    [
        [[3, 70], [13]],  # 72 rows > 16 * 3 lookups: no map over the rows
        # 7 distinct rows > 6 segments: group 2 (row 13, five bags) on the row path, group 3 (six
        # rows, one bag) on the segment path
        [[13, 18, 19, 20, 21, 22, 23], [13], [13], [13], [13]],
        [list(range(72))],  # one bag reading every row: 72 rows, 12 segments
    ],
    ids=["large-table", "row-and-segment-paths", "one-long-bag"],
)
def test_group_path(bags, pooling, weighted):
    """Batches the distinct-row pass does not take: too large a table for a map over its rows, or
    more distinct rows than (bag, group) segments."""
    gen = torch.Generator().manual_seed(4)
    cores = random_cores(P, Q, RANKS, generator=gen)
    indices = torch.tensor([i for b in bags for i in b])
    offsets = torch.tensor([0, *torch.tensor([len(b) for b in bags]).cumsum(0).tolist()])
    psw = torch.rand(indices.numel(), generator=gen, dtype=torch.float64) if weighted else None
    with torch.no_grad():
        phases = _phases(lambda: tt_embedding_bag(cores, indices, offsets, psw, pooling, "grt"))
        out = tt_embedding_bag(cores, indices, offsets, psw, pooling, "grt")
    assert GROUPS_PHASE in phases and SLOTS_PHASE not in phases, phases
    ref = embedding_bag_ref(cores, indices, offsets, psw, pooling)
    torch.testing.assert_close(out, ref, **tolerances(torch.float64))


def test_more_groups_than_int32_keeps_the_plan_path():
    """2^31 - 1 groups or more do not fit the sorted lookups' int32 group: the kernel builds the
    plan (rank-1 cores of a 4.3e9-row table stay tiny)."""
    p, q, ranks = [46341, 46341, 2], [1, 1, 2], [1, 1]
    cores = random_cores(p, q, ranks, generator=torch.Generator().manual_seed(8))
    indices = torch.tensor([0, 4_294_000_000, 5, 4_294_000_000, 77])
    offsets = torch.tensor([0, 2, 5])
    with torch.no_grad():
        phases = _phases(lambda: tt_embedding_bag(cores, indices, offsets, None, "sum", "grt"))
        out = tt_embedding_bag(cores, indices, offsets, None, "sum", "grt")
    assert SLOTS_PHASE in phases and GROUPS_PHASE not in phases, phases
    digits = [[(int(i) // (46341 * 2)), (int(i) // 2) % 46341, int(i) % 2] for i in indices]
    rows = torch.stack([
        torch.einsum("ar,rbs,sc->abc", cores[0][a, 0], cores[1][b], cores[2][c][:, :, 0]).reshape(-1)
        for a, b, c in digits
    ])
    torch.testing.assert_close(out, torch.stack([rows[:2].sum(0), rows[2:].sum(0)]), **tolerances(torch.float64))


def test_empty_batch():
    cores = random_cores(P, Q, RANKS, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = tt_embedding_bag(cores, torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    assert out.shape == (3, 4) and out.eq(0).all()


def test_same_bits_for_any_thread_count():
    """Each bag is summed by one worker in lookup order: the output does not depend on threads."""
    gen = torch.Generator().manual_seed(6)
    cores = random_cores([21, 22, 50], [4, 4, 4], [16, 16], dtype=torch.float32, generator=gen)
    indices = torch.randint(0, 23100, (20000,), generator=gen)
    offsets = torch.arange(0, 20001, 40)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(tt_embedding_bag(cores, indices, offsets, None, "sum", "grt"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    ref = embedding_bag_ref([c.double() for c in cores], indices, offsets)
    torch.testing.assert_close(outs[0].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("used", ["low-rows", "both-ends", "every-row"])
def test_distinct_rows_on_several_threads(used):
    """The distinct-row pass with each thread marking the rows of its share of the lookups (a batch
    of 16k lookups), numbered 8 rows at a time (5,859 rows: a partial last block): unused ranges of
    rows, cached rows among the used ones and cached rows the batch does not read give the
    reference's output on 1, 2 and 3 threads."""
    gen = torch.Generator().manual_seed(9)
    p = [7, 27, 31]  # 5,859 rows, groups of 31
    cores = random_cores(p, Q, RANKS, generator=gen)
    if used == "low-rows":  # the upper rows unread
        indices = torch.randint(0, 1500, (16384,), generator=gen)
    elif used == "both-ends":  # the middle rows unread
        indices = torch.randint(0, 2000, (16384,), generator=gen)
        indices[::2] += 3859
    else:
        indices = torch.cat([torch.arange(5859), torch.randint(0, 5859, (10525,), generator=gen)])
    offsets = torch.arange(0, 16385, 64)
    cache_ids = torch.tensor([0, 30, 31, 1499, 1500, 3000, 3859, 5858])
    cache_weight = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    ref = embedding_bag_ref(cores, indices, offsets, None, "sum", cache=(cache_weight, cache_ids))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                call = lambda: tt_embedding_bag(  # noqa: E731
                    cores, indices, offsets, None, "sum", "grt", cache_weight=cache_weight, cache_ids=cache_ids
                )
                assert ROWS_PHASE in _phases(call)
                torch.testing.assert_close(call(), ref, **tolerances(torch.float64))
    finally:
        torch.set_num_threads(threads)


def test_module_in_eval_serves_with_padding_rows():
    """A module whose table has fewer rows than prod(p_shapes), in inference mode."""
    config = TTEmbeddingBagConfig(name="t", num_embeddings=70, embedding_dim=4, tt_p_shapes=P, tt_q_shapes=Q,
                                  tt_ranks=RANKS, variant="grt")
    bag = TTEmbeddingBag(config).double().eval()
    gen = torch.Generator().manual_seed(7)
    indices = torch.randint(0, 70, (60,), generator=gen)
    offsets = torch.tensor([0, 10, 10, 35, 60])
    with torch.inference_mode():
        out = bag(indices, offsets)
    ref = embedding_bag_ref([c.detach() for c in bag.compute_cores()], indices, offsets)
    torch.testing.assert_close(out, ref, **tolerances(torch.float64))
    with torch.inference_mode(), pytest.raises(ValueError, match="indices.*70"):
        bag(torch.tensor([1, 70]), torch.tensor([0, 2]))


@settings(max_examples=60, deadline=None)
@given(problems(max_batch=6, max_len=8))
def test_no_grad_forward_property(problem):
    """Random shapes, ranks, bags and shared rows: the plan-free forward equals the reference."""
    cores, indices, offsets, psw = problem.tensors(weighted=True)
    with torch.no_grad():
        for pooling in ("sum", "mean"):
            out = tt_embedding_bag(cores, indices, offsets, psw, pooling, "grt")
            ref = embedding_bag_ref(cores, indices, offsets, psw, pooling)
            torch.testing.assert_close(out, ref, **tolerances(torch.float64))
