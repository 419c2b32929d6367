"""Forward and backward of ``torchrec_tt.tt_embedding_bag`` against the dense reference.

Reference: rows materialized from the cores by whole-core contraction
(:func:`torchrec_tt.tt_to_dense`), pooled by ``F.embedding_bag``; gradients by autograd
through that reference. Runs the compiled ops when the extension is built, else the
pure-PyTorch ones (``torchrec_tt.ops.uses_extension`` says which).
"""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchrec_tt
from torchrec_tt import tt_embedding_bag, tt_to_dense
from tt_testing import DEVICES, embedding_bag_ref, grads_or_zeros, problems, random_cores, tolerances

VARIANTS = ["tt", "grt"]
POOLINGS = ["sum", "mean"]


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=30)
@given(
    problem=problems(),
    variant=st.sampled_from(VARIANTS),
    pooling=st.sampled_from(POOLINGS),
    weighted=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_forward_matches_reference(problem, variant, pooling, weighted, dtype, index_dtype, device):
    cores, indices, offsets, psw = problem.tensors(dtype, index_dtype, device, weighted)
    out = tt_embedding_bag(cores, indices, offsets, psw, pooling=pooling, variant=variant)
    ref = embedding_bag_ref(cores, indices, offsets, psw, pooling)
    assert out.shape == (problem.batch_size, problem.dim)
    assert out.dtype == dtype and out.device.type == device
    torch.testing.assert_close(out, ref, **tolerances(dtype))


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=30)
@given(
    problem=problems(),
    variant=st.sampled_from(VARIANTS),
    pooling=st.sampled_from(POOLINGS),
    weighted=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_backward_matches_reference(problem, variant, pooling, weighted, dtype, index_dtype, device):
    cores, indices, offsets, psw = problem.tensors(dtype, index_dtype, device, weighted)
    leaves = [c.clone().requires_grad_(True) for c in cores]
    ref_leaves = [c.clone().requires_grad_(True) for c in cores]
    inputs, ref_inputs = list(leaves), list(ref_leaves)
    psw_leaf = ref_psw = None
    if weighted:
        psw_leaf, ref_psw = psw.clone().requires_grad_(True), psw.clone().requires_grad_(True)
        inputs.append(psw_leaf)
        ref_inputs.append(ref_psw)

    out = tt_embedding_bag(leaves, indices, offsets, psw_leaf, pooling=pooling, variant=variant)
    ref = embedding_bag_ref(ref_leaves, indices, offsets, ref_psw, pooling)
    gen = torch.Generator().manual_seed(problem.seed + 1)
    grad_output = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    grads = grads_or_zeros(out, inputs, grad_output)
    ref_grads = grads_or_zeros(ref, ref_inputs, grad_output)
    for k, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.shape == r.shape, f"gradient {k}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        torch.testing.assert_close(g, r, **tolerances(dtype), msg=lambda m: f"gradient {k}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_variants_agree_on_grouped_batch(variant, pooling, device):
    """Many lookups per group and repeated rows: the case where grt actually reduces."""
    p, q, ranks = [3, 4, 5], [2, 3, 2], [3, 2]
    gen = torch.Generator().manual_seed(7)
    cores = random_cores(p, q, ranks, generator=gen, device=device)
    # Groups are blocks of 5 consecutive rows; bags mix rows of 1-3 groups, with repeats.
    indices = torch.tensor([0, 1, 4, 4, 5, 9, 5, 6, 7, 55, 59, 59, 0], device=device)
    offsets = torch.tensor([0, 4, 4, 9, 12, 13], device=device)
    psw = torch.rand(indices.numel(), generator=gen, dtype=torch.float64).to(device)
    out = tt_embedding_bag(cores, indices, offsets, psw, pooling=pooling, variant=variant)
    torch.testing.assert_close(out, embedding_bag_ref(cores, indices, offsets, psw, pooling), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("weighted", [False, True])
def test_empty_bags_give_zeros_and_zero_grads(variant, pooling, weighted, device):
    cores = [c.requires_grad_(True) for c in random_cores([2, 3], [2, 2], [3], device=device)]
    indices = torch.tensor([5, 1], device=device)
    offsets = torch.tensor([0, 0, 2, 2], device=device)  # bags 0 and 2 are empty
    psw = torch.tensor([0.5, 2.0], dtype=torch.float64, device=device) if weighted else None
    out = tt_embedding_bag(cores, indices, offsets, psw, pooling=pooling, variant=variant)
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[2]) == 0
    assert torch.count_nonzero(out[1]) > 0
    torch.testing.assert_close(out, embedding_bag_ref(cores, indices, offsets, psw, pooling), rtol=1e-10, atol=1e-10)
    # The gradient of an empty bag's output reaches no core slice.
    grad_output = torch.zeros_like(out)
    grad_output[0] = 1.0
    grad_output[2] = -3.0
    grads = grads_or_zeros(out, cores, grad_output)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("num_bags", [0, 3], ids=["B0", "B3_all_empty"])
def test_no_lookups(variant, pooling, index_dtype, weighted, num_bags, device):
    """``B = 0`` (offsets = [0]) and a batch of only empty bags: zeros, and zero gradients."""
    cores = [c.requires_grad_(True) for c in random_cores([2, 3, 2], [2, 1, 3], [2, 3], device=device)]
    indices = torch.empty(0, dtype=index_dtype, device=device)
    offsets = torch.zeros(num_bags + 1, dtype=index_dtype, device=device)
    psw = torch.empty(0, dtype=torch.float64, device=device, requires_grad=True) if weighted else None
    out = tt_embedding_bag(cores, indices, offsets, psw, pooling=pooling, variant=variant)
    assert out.shape == (num_bags, 6) and out.dtype == torch.float64
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    for k, core in enumerate(cores):
        assert core.grad is not None, f"cores[{k}].grad is None after backward of an empty batch"
        assert core.grad.shape == core.shape and torch.count_nonzero(core.grad) == 0
    if weighted:
        assert psw.grad is not None, "per_sample_weights.grad is None after backward of an empty batch"
        assert psw.grad.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mismatched_index_and_offset_dtypes_are_converted(variant, device):
    cores = random_cores([3, 4], [2, 3], [2], device=device)
    indices = torch.tensor([11, 0, 3, 3, 7], device=device)
    offsets = torch.tensor([0, 2, 5], device=device)
    expected = embedding_bag_ref(cores, indices, offsets)
    for idx_dtype, off_dtype in itertools.permutations([torch.int32, torch.int64]):
        out = tt_embedding_bag(cores, indices.to(idx_dtype), offsets.to(off_dtype), variant=variant)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_pooling_type_enum_is_accepted(variant, device):
    from torchrec.modules.embedding_configs import PoolingType

    cores = random_cores([3, 4], [2, 3], [2], device=device)
    indices = torch.tensor([11, 0, 3], device=device)
    offsets = torch.tensor([0, 1, 3], device=device)
    for pooling in (PoolingType.SUM, PoolingType.MEAN):
        out = tt_embedding_bag(cores, indices, offsets, pooling=pooling, variant=variant)
        ref = embedding_bag_ref(cores, indices, offsets, pooling=pooling.value.lower())
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_inputs(variant, device):
    """Views (permuted cores, strided indices) give the reference result or a clear error."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(3, 2, 1, 2, generator=gen, dtype=torch.float64).to(device),
            torch.randn(4, 3, 2, 1, generator=gen, dtype=torch.float64).to(device)]
    # Stored as (m, n, r_in, r_out), viewed as (m, r_in, n, r_out): not contiguous.
    cores = [b.permute(0, 2, 1, 3) for b in base]
    assert not all(c.is_contiguous() for c in cores)
    indices = torch.tensor([0, 99, 11, 99, 5, 99, 5, 99], device=device)[::2]
    offsets = torch.tensor([0, 1, 4], device=device)
    ref = embedding_bag_ref([c.contiguous() for c in cores], indices.contiguous(), offsets)
    try:
        out = tt_embedding_bag(cores, indices, offsets, variant=variant)
    except (ValueError, RuntimeError) as err:
        assert "contiguous" in str(err), f"non-contiguous input rejected without saying so: {err}"
        return
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reduced precision is CUDA-only; CUDA is not available")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(deadline=None, max_examples=10)
@given(problem=problems(max_rank=3), pooling=st.sampled_from(POOLINGS), weighted=st.booleans())
def test_reduced_precision_cuda(problem, pooling, weighted, variant, dtype):
    cores, indices, offsets, psw = problem.tensors(torch.float64, torch.int64, "cuda", weighted)
    ref = embedding_bag_ref(cores, indices, offsets, psw, pooling)
    low = [c.to(dtype) for c in cores]
    out = tt_embedding_bag(low, indices, offsets, None if psw is None else psw.to(dtype), pooling=pooling, variant=variant)
    assert out.dtype == dtype
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2 * scale)


def test_tt_to_dense_reference_matches_row_chains():
    """The reference itself: whole-core contraction equals the per-row chain of the layout."""
    p, q, ranks = [3, 2, 4], [2, 3, 2], [3, 2]
    cores = random_cores(p, q, ranks, generator=torch.Generator().manual_seed(11))
    dense = tt_to_dense(cores)
    assert dense.shape == (24, 12)
    for row in range(24):
        digits = [row // 8, (row // 4) % 2, row % 4]  # mixed radix, most significant first
        acc = cores[0][digits[0]].reshape(q[0], -1)  # (n_0, R[1])
        for core, i in zip(cores[1:], digits[1:]):
            acc = (acc @ core[i].reshape(core.size(1), -1)).reshape(-1, core.size(3))
        torch.testing.assert_close(dense[row], acc.reshape(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tt_to_dense(cores, num_rows=10), dense[:10])


def test_dispatch_reports_the_path_in_use():
    """HAS_EXTENSION and uses_extension agree: the tests above ran the path they name."""
    assert torchrec_tt.ops.uses_extension(torch.device("cpu")) == torchrec_tt.HAS_EXTENSION
    assert not torchrec_tt.ops.uses_extension(torch.device("meta"))
