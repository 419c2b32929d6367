"""One (bag, group) plan per batch: built once in forward, reused by backward (issue: kernels).

The plan is the packed tensor of ``torchrec_tt::group_plan`` (docs/design.md section 3.1). These
tests check, on the compiled CPU ops, that autograd builds it exactly once per forward+backward and
that the backward does not regroup; that a plan from another batch is refused; and that results do
not depend on whether the plan is passed in or built by the op.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import torchrec_tt
from torchrec_tt import tt_embedding_bag
from tt_testing import checkout_env, random_cores

pytestmark = pytest.mark.skipif(
    not torchrec_tt.ops.uses_extension(torch.device("cpu")), reason="needs the compiled CPU ops"
)


def _batch(seed=0, rows=(5, 6, 7), batch=9, max_len=12):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len, (batch,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    num_rows = rows[0] * rows[1] * rows[2]
    indices = torch.randint(0, num_rows, (int(offsets[-1]),), generator=gen)
    return indices, offsets


def _event_counts(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {}
    for e in prof.events():
        if e.name.startswith("torchrec_tt::"):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def test_forward_backward_builds_the_plan_once():
    cores = [c.requires_grad_(True) for c in random_cores([5, 6, 7], [2, 2, 2], [3, 4])]
    indices, offsets = _batch()

    def step():
        out = tt_embedding_bag(cores, indices, offsets, variant="grt")
        out.backward(torch.ones_like(out))

    counts = _event_counts(step)
    assert counts.get("torchrec_tt::group_plan") == 1
    assert counts.get("torchrec_tt::tt_embedding_bag") == 1
    assert counts.get("torchrec_tt::tt_embedding_bag_backward") == 1
    # Neither op regroups: the plan was passed to both.
    assert counts.get("torchrec_tt::grt::build_plan", 0) == 0


def test_ops_without_a_plan():
    """The forward op given no plan does not group the batch (its distinct-row path, docs/design.md
    section 3.4); the backward op given none builds its own."""
    cores = random_cores([5, 6, 7], [2, 2, 2], [3, 4])
    indices, offsets = _batch()
    ops = torch.ops.torchrec_tt
    counts = _event_counts(lambda: ops.tt_embedding_bag(cores, indices, offsets, None, 0, 1))
    assert counts.get("torchrec_tt::grt::distinct_rows") == 1
    assert counts.get("torchrec_tt::grt::build_plan", 0) == 0
    grad = torch.ones(offsets.numel() - 1, 8, dtype=cores[0].dtype)
    counts = _event_counts(lambda: ops.tt_embedding_bag_backward(grad, cores, indices, offsets, None, 0, 1, False))
    assert counts.get("torchrec_tt::grt::build_plan") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_given_plan_and_built_plan_agree_bitwise(dtype):
    cores = random_cores([5, 6, 7], [2, 2, 2], [3, 4], dtype=dtype)
    indices, offsets = _batch(seed=3)
    ops = torch.ops.torchrec_tt
    plan = ops.group_plan(indices, offsets, 7)
    grad = torch.randn(offsets.numel() - 1, 8, dtype=dtype)
    # Without a plan the forward takes its distinct-row path: another summation order.
    torch.testing.assert_close(
        ops.tt_embedding_bag(cores, indices, offsets, None, 0, 1, plan),
        ops.tt_embedding_bag(cores, indices, offsets, None, 0, 1),
    )
    with_plan, _, _ = ops.tt_embedding_bag_backward(grad, cores, indices, offsets, None, 0, 1, False, plan)
    without, _, _ = ops.tt_embedding_bag_backward(grad, cores, indices, offsets, None, 0, 1, False)
    for a, b in zip(with_plan, without):
        assert torch.equal(a, b)


def test_plan_of_another_batch_is_refused():
    cores = random_cores([5, 6, 7], [2, 2, 2], [3, 4])
    indices, offsets = _batch(seed=1)
    other_indices, other_offsets = _batch(seed=2, batch=4)
    ops = torch.ops.torchrec_tt
    other = ops.group_plan(other_indices, other_offsets, 7)
    with pytest.raises(ValueError, match=r"tt_embedding_bag: plan must be .* for this batch"):
        ops.tt_embedding_bag(cores, indices, offsets, None, 0, 1, other)
    # Same sizes but grouped for another last_rows: the header gives it away.
    wrong_rows = ops.group_plan(indices, offsets, 5)
    with pytest.raises(ValueError, match=r"plan was built for another batch or table .*last_rows 5"):
        ops.tt_embedding_bag(cores, indices, offsets, None, 0, 1, wrong_rows)
    with pytest.raises(ValueError, match=r"plan must be"):
        ops.tt_embedding_bag(cores, indices, offsets, None, 0, 1, torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("threads", [1, 2])
def test_results_match_the_reference_for_any_thread_count(threads):
    """Forward and backward reduce per-thread buffers in a fixed order: right, and repeatable."""
    cores = random_cores([5, 6, 7], [2, 2, 2], [3, 4], dtype=torch.float64)
    indices, offsets = _batch(seed=4, batch=600, max_len=30)  # enough work to use every thread
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = tt_embedding_bag(cores, indices, offsets, variant="grt")
        again = tt_embedding_bag(cores, indices, offsets, variant="grt")
    finally:
        torch.set_num_threads(prev)
    rows = torchrec_tt.tt_to_dense(cores, 5 * 6 * 7)
    ref = torch.nn.functional.embedding_bag(indices, rows, offsets[:-1], mode="sum")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, again)


_CHUNKED_RUN = """
import torch, torchrec_tt
from torchrec_tt import tt_embedding_bag
torch.manual_seed(0)
shapes = {3: [(5, 1, 2, 3), (6, 3, 2, 4), (7, 4, 2, 1)], 4: [(3, 1, 2, 3), (4, 3, 1, 2), (5, 2, 2, 3), (4, 3, 2, 1)]}
for d, core_shapes in shapes.items():  # d = 4: two middle cores, the slot visit order keys on the last
    cores = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in core_shapes]
    num_rows = 1
    for s in core_shapes:
        num_rows *= s[0]
    lengths = torch.randint(0, 12, (40,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    indices = torch.randint(0, num_rows, (int(offsets[-1]),))
    weights = torch.rand(indices.numel(), dtype=torch.float64, requires_grad=True)
    grad = torch.randn(40, 8, dtype=torch.float64)
    results = []
    for variant in ("grt", "tt"):  # tt: per-lookup chains, no slot chunks
        out = tt_embedding_bag(cores, indices, offsets, weights, pooling="mean", variant=variant)
        results.append([out] + list(torch.autograd.grad(out, cores + [weights], grad)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
print("chunked ok")
"""


def test_chunked_backward_matches_tt(tmp_path):
    """A scratch budget of two slots' chains makes the grt backward run in many slot chunks (and the
    forward on one part): the results still equal the per-lookup tt kernels'."""
    env = checkout_env(TORCHREC_TT_CPU_SCRATCH_BUDGET_BYTES="1024")
    done = subprocess.run([sys.executable, "-c", _CHUNKED_RUN], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "chunked ok" in done.stdout
