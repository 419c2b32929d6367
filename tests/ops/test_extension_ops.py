"""The compiled ops (``torch.ops.torchrec_tt.*``) against the pure-PyTorch ones.

Also: ``group_plan`` against :func:`torchrec_tt.grouping.group_plan_python`, meta-device
shapes, and ``torch.library.opcheck`` (schema, fake kernel, autograd registration,
aot_dispatch_dynamic). Skipped when the extension is not built; CI builds it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchrec_tt
from torchrec_tt import PoolingMode, Variant, _python_ops
from torchrec_tt.grouping import group_plan_python, plan_numel, unpack_plan
from tt_testing import DEVICES, OP_ERRORS, assert_message, problems, random_cores, tolerances

pytestmark = pytest.mark.skipif(
    not torchrec_tt.HAS_EXTENSION, reason="torchrec_tt._C is not built (pip install --no-build-isolation -e .)"
)


# The raw ops take the enums' int values.
_VARIANTS = [int(v) for v in Variant]
_POOLING_MODES = [int(m) for m in PoolingMode]


def _ops():
    return torch.ops.torchrec_tt


def _require_kernel(device):
    if not torchrec_tt.ops.uses_extension(torch.device(device)):
        pytest.skip(f"the extension has no {device} kernel in this build")


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=25)
@given(
    problem=problems(),
    variant=st.sampled_from(_VARIANTS),
    pooling_mode=st.sampled_from(_POOLING_MODES),
    weighted=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_compiled_forward_matches_python(problem, variant, pooling_mode, weighted, dtype, index_dtype, device):
    _require_kernel(device)
    cores, indices, offsets, psw = problem.tensors(dtype, index_dtype, device, weighted)
    out = _ops().tt_embedding_bag(cores, indices, offsets, psw, pooling_mode, variant)
    expected = _python_ops.tt_embedding_bag_python(cores, indices, offsets, psw, pooling_mode, variant)
    assert out.shape == expected.shape and out.dtype == dtype and out.device == expected.device
    torch.testing.assert_close(out, expected, **tolerances(dtype))


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=25)
@given(
    problem=problems(),
    variant=st.sampled_from(_VARIANTS),
    pooling_mode=st.sampled_from(_POOLING_MODES),
    weighted=st.booleans(),
    psw_requires_grad=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_compiled_backward_matches_python(
    problem, variant, pooling_mode, weighted, psw_requires_grad, dtype, index_dtype, device
):
    _require_kernel(device)
    cores, indices, offsets, psw = problem.tensors(dtype, index_dtype, device, weighted)
    psw_requires_grad = psw_requires_grad and weighted
    gen = torch.Generator().manual_seed(problem.seed)
    grad_output = torch.randn(problem.batch_size, problem.dim, generator=gen, dtype=torch.float64).to(dtype).to(device)
    args = (grad_output, cores, indices, offsets, psw, pooling_mode, variant, psw_requires_grad)
    core_grads, psw_grad, _ = _ops().tt_embedding_bag_backward(*args)
    ref_core_grads, ref_psw_grad = _python_ops.tt_embedding_bag_backward_python(*args)
    assert len(core_grads) == len(cores)
    for k, (g, r, c) in enumerate(zip(core_grads, ref_core_grads, cores)):
        assert g.shape == c.shape and g.dtype == dtype, f"core_grads[{k}]: {tuple(g.shape)} {g.dtype}"
        torch.testing.assert_close(g, r, **tolerances(dtype), msg=lambda m: f"core_grads[{k}]: {m}")
    if psw_requires_grad:
        assert psw_grad.shape == (len(problem.indices),)
        torch.testing.assert_close(psw_grad, ref_psw_grad, **tolerances(dtype))
    else:
        assert psw_grad.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=30)
@given(problem=problems(max_batch=6, max_len=8), index_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_compiled_group_plan_matches_python(problem, index_dtype, device):
    _require_kernel(device)
    _, indices, offsets, _ = problem.tensors(index_dtype=index_dtype, device=device)
    last_rows = problem.p_shapes[-1]
    plan = _ops().group_plan(indices, offsets, last_rows)
    expected = group_plan_python(indices, offsets, last_rows)
    nnz, batch = len(problem.indices), offsets.numel() - 1
    assert plan.dtype == torch.int64 and plan.shape == (plan_numel(nnz, batch),)  # sizes from (L, B) only
    f = unpack_plan(plan.cpu(), nnz, batch)
    S, U = expected.num_segments, expected.num_slots
    assert f["header"][:5].tolist() == [S, U, nnz, batch, last_rows]
    assert torch.equal(f["lookup_segment"], expected.lookup_segment.cpu())
    assert torch.equal(f["segment_bag"][:S], expected.segment_bag.cpu())
    assert torch.equal(f["segment_group"][:S], expected.segment_group.cpu())
    assert torch.equal(f["segment_slot"][:S], expected.segment_slot.cpu())
    assert torch.equal(f["slot_group"][:U], expected.slot_group.cpu())
    # Kernel-side fields, derived independently from the reference plan.
    idx = indices.cpu().to(torch.int64)
    seg = expected.lookup_segment.cpu()
    order = sorted(range(nnz), key=lambda j: (int(seg[j]), j))  # (bag, group) then position
    assert f["sorted_lookup"].tolist() == order
    assert f["sorted_last"].tolist() == [int(idx[j]) % last_rows for j in order]
    sizes = torch.bincount(seg, minlength=S)[:S] if nnz else torch.zeros(0, dtype=torch.int64)
    assert f["segment_start"][: S + 1].tolist() == [0, *torch.cumsum(sizes, 0).tolist()]
    per_bag = torch.bincount(expected.segment_bag.cpu(), minlength=batch)[:batch] if S else torch.zeros(batch, dtype=torch.int64)
    assert f["bag_segment_start"].tolist() == [0, *torch.cumsum(per_bag, 0).tolist()]
    by_slot = sorted(range(S), key=lambda s: (int(expected.segment_slot[s]), s))
    assert f["slot_segment"][:S].tolist() == by_slot
    per_slot = torch.bincount(expected.segment_slot.cpu(), minlength=U)[:U] if S else torch.zeros(U, dtype=torch.int64)
    assert f["slot_segment_start"][: U + 1].tolist() == [0, *torch.cumsum(per_slot, 0).tolist()]
    assert f["bag_hits"].tolist() == [0] * batch  # no cache


def test_compiled_group_plan_rejects_bad_batches():
    _require_kernel("cpu")
    with pytest.raises(OP_ERRORS) as excinfo:
        _ops().group_plan(torch.tensor([3, -4, 1]), torch.tensor([0, 3]), 4)
    assert_message(excinfo, r"^group_plan: indices\[1\] must be >= 0, got -4$")
    with pytest.raises(OP_ERRORS) as excinfo:
        _ops().group_plan(torch.tensor([3, 4, 1]), torch.tensor([0, 2, 1, 3]), 4)
    assert_message(excinfo, r"non-decreasing", r"offsets\[1\] ?= ?2")
    with pytest.raises(OP_ERRORS) as excinfo:
        _ops().group_plan(torch.tensor([3, 4, 1]), torch.tensor([0, 2]), 4)
    assert_message(excinfo, r"offsets\[-1\]", r"\b3\b", r"\b2\b")


@pytest.mark.parametrize(
    "p, q, ranks, nnz, batch",
    [([3, 4], [2, 3], [2], 7, 3), ([2, 3, 4], [1, 2, 5], [3, 2], 0, 0), ([2, 2, 2, 2], [2, 1, 2, 3], [2, 3, 1], 5, 9)],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_meta_shapes(p, q, ranks, nnz, batch, weighted):
    full = [1, *ranks, 1]
    cores = [torch.empty(m, full[k], n, full[k + 1], device="meta", dtype=torch.float64) for k, (m, n) in enumerate(zip(p, q))]
    indices = torch.empty(nnz, dtype=torch.int64, device="meta")
    offsets = torch.empty(batch + 1, dtype=torch.int64, device="meta")
    psw = torch.empty(nnz, dtype=torch.float64, device="meta") if weighted else None
    dim = 1
    for n in q:
        dim *= n
    out = _ops().tt_embedding_bag(cores, indices, offsets, psw, 0, 1)
    assert out.device.type == "meta" and out.shape == (batch, dim) and out.dtype == torch.float64
    grads, psw_grad, _ = _ops().tt_embedding_bag_backward(
        torch.empty(batch, dim, device="meta", dtype=torch.float64), cores, indices, offsets, psw, 1, 0, weighted
    )
    assert [g.shape for g in grads] == [c.shape for c in cores]
    assert psw_grad.shape == ((nnz,) if weighted else (0,))
    plan = _ops().group_plan(indices, offsets, p[-1])
    assert plan.shape == (plan_numel(nnz, batch),) and plan.dtype == torch.int64
    out = _ops().tt_embedding_bag(cores, indices, offsets, psw, 0, 1, plan)
    assert out.shape == (batch, dim)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    cases = []
    for p, q, ranks, indices, offsets in [
        ([3, 4, 2], [2, 1, 2], [2, 3], [0, 5, 5, 23, 4, 11], [0, 3, 3, 6]),
        ([4, 5], [3, 2], [3], [19, 0, 1, 2], [0, 1, 4]),
        ([2, 2], [2, 2], [2], [], [0, 0]),
    ]:
        cores = random_cores(p, q, ranks, generator=gen)
        idx, off = torch.tensor(indices, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)
        for weighted in (False, True):
            psw = torch.rand(len(indices), generator=gen, dtype=torch.float64) if weighted else None
            cases.append((cores, idx, off, psw))
    return cases


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: str(Variant(v)))
@pytest.mark.parametrize("pooling_mode", _POOLING_MODES, ids=lambda m: str(PoolingMode(m)))
def test_opcheck_tt_embedding_bag(case, variant, pooling_mode):
    cores, indices, offsets, psw = _opcheck_cases()[case]
    cores = [c.requires_grad_(True) for c in cores]
    if psw is not None:
        psw = psw.requires_grad_(True)
    torch.library.opcheck(_ops().tt_embedding_bag.default, (cores, indices, offsets, psw, pooling_mode, variant))
    plan = _ops().group_plan(indices, offsets, cores[-1].shape[0])
    torch.library.opcheck(
        _ops().tt_embedding_bag.default, (cores, indices, offsets, psw, pooling_mode, variant, plan)
    )


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: str(Variant(v)))
def test_opcheck_tt_embedding_bag_backward(case, variant):
    cores, indices, offsets, psw = _opcheck_cases()[case]
    batch, dim = offsets.numel() - 1, 1
    for c in cores:
        dim *= c.size(2)
    grad_output = torch.randn(batch, dim, dtype=torch.float64)
    torch.library.opcheck(
        _ops().tt_embedding_bag_backward.default,
        (grad_output, cores, indices, offsets, psw, int(PoolingMode.MEAN), variant, psw is not None),
    )


@pytest.mark.parametrize("case", range(0, 6, 2))
def test_opcheck_group_plan(case):
    _, indices, offsets, _ = _opcheck_cases()[case]
    # Entries past the counts are unspecified; compare only the schema, fake and dispatch tests.
    torch.library.opcheck(
        _ops().group_plan.default,
        (indices, offsets, 2),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
