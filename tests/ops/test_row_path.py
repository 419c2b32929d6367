"""The compiled CPU grt kernels' two per-slot paths (docs/design.md, section 3.2): a slot whose
segments use few distinct rows computes each row once (row path), the others contract per
segment (segment path). Batches built to put slots on each path, checked against the
materialized table, in float64, with and without per-sample weights (whose gradient takes the
segment path in the backward)."""

import pytest
import torch

from torchrec_tt import TTEmbeddingBagConfig, count_ops
from torchrec_tt.ops import tt_embedding_bag, uses_extension
from tt_testing import embedding_bag_ref, grads_or_zeros, random_cores, tolerances

pytestmark = pytest.mark.skipif(
    not uses_extension(torch.device("cpu")), reason="the C++ extension is not built: no compiled CPU kernels"
)

P, Q, RANKS = [3, 4, 6], [2, 1, 2], [3, 2]  # 72 rows, groups of 6 rows (id // 6)
# The same batches in a 720-row table: over 16 rows per lookup, so the forward takes the plan-driven
# slot pass; in the 72-row table it takes the distinct-row pass when the batch has no more distinct
# rows than segments (docs/design.md section 3.4). The backward always runs on the plan.
TABLES = {"72-rows": P, "720-rows": [30, 4, 6]}


def _batch(kind: str):
    if kind == "rows":  # group 2's row 13 in every bag: 1 row, 5 segments
        bags = [[13, 40], [13], [13, 1], [13, 71], [13, 13]]
    elif kind == "segments":  # group 3: 6 rows, 2 segments
        bags = [[18, 19, 20, 21, 22], [19, 23]]
    else:  # both: group 0 on the row path, group 5 on the segment path
        bags = [[0, 30, 31, 32], [0, 33], [0], [34, 35, 0, 5]]
    indices = torch.tensor([i for b in bags for i in b])
    offsets = torch.tensor([0, *torch.tensor([len(b) for b in bags]).cumsum(0).tolist()])
    return indices, offsets


@pytest.mark.parametrize("kind", ["rows", "segments", "mixed"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("table", list(TABLES))
def test_both_paths_match_the_reference(kind, pooling, weighted, table):
    p = TABLES[table]
    indices, offsets = _batch(kind)
    config = TTEmbeddingBagConfig(name="t", num_embeddings=p[0] * 24, embedding_dim=4, tt_p_shapes=p, tt_q_shapes=Q,
                                  tt_ranks=RANKS)
    counts = count_ops(config, indices, offsets)
    rows_on_row_path = {"rows": counts.num_distinct_rows, "segments": 0}.get(kind)
    if rows_on_row_path is not None:
        assert counts.num_row_path_slots_rows == rows_on_row_path
    else:
        assert 0 < counts.num_row_path_slots_rows < counts.num_distinct_rows
    gen = torch.Generator().manual_seed(0)
    cores = [c.requires_grad_(True) for c in random_cores(p, Q, RANKS, generator=gen)]
    psw = torch.rand(indices.numel(), generator=gen, dtype=torch.float64, requires_grad=True) if weighted else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = tt_embedding_bag(cores, indices, offsets, psw, pooling, "grt")
    phases = {e.key for e in prof.key_averages()}
    slot_pass = table == "720-rows" or counts.num_distinct_rows > counts.num_segments
    assert ("torchrec_tt::grt_forward::slots" in phases) == slot_pass, phases
    ref = embedding_bag_ref(cores, indices, offsets, psw, pooling)
    torch.testing.assert_close(out, ref, **tolerances(torch.float64))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    inputs = [*cores, *([psw] if weighted else [])]
    for got, want in zip(grads_or_zeros(out, inputs, grad), grads_or_zeros(ref, inputs, grad)):
        torch.testing.assert_close(got, want, **tolerances(torch.float64))


def test_row_path_gradcheck():
    indices, offsets = _batch("mixed")
    gen = torch.Generator().manual_seed(1)
    cores = [c.requires_grad_(True) for c in random_cores(P, Q, RANKS, generator=gen)]
    assert torch.autograd.gradcheck(lambda *cs: tt_embedding_bag(list(cs), indices, offsets, None, "mean", "grt"), cores)


@pytest.mark.parametrize("q, ranks", [([4, 4, 4], [32, 32]), ([2, 4, 8], [8, 16]), ([4, 2, 2], [8, 8])])
def test_float32_register_block_shapes_match_the_reference(q, ranks):
    """float32 with N' and R' multiples of 8: Q's transposes go by 8 x 8 register blocks."""
    p = [5, 6, 7]
    gen = torch.Generator().manual_seed(2)
    cores = [c.requires_grad_(True) for c in random_cores(p, q, ranks, dtype=torch.float32, generator=gen)]
    indices = torch.randint(0, 210, (300,), generator=gen)
    offsets = torch.tensor([0, 50, 120, 121, 300])
    for variant in ("grt", "tt"):
        out = tt_embedding_bag(cores, indices, offsets, None, "sum", variant)
        ref = embedding_bag_ref([c.double() for c in cores], indices, offsets)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        grad = torch.randn(out.shape, generator=gen)
        got = grads_or_zeros(out, cores, grad)
        want = grads_or_zeros(embedding_bag_ref(cores, indices, offsets), cores, grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
