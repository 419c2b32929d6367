"""Bad inputs at the op boundary raise ``ValueError`` naming the argument and the bad value.

The pure-PyTorch path and the compiled ops (``TORCH_CHECK_VALUE``) raise the same type;
messages follow ``<op>: <argument> <what was expected>, got <value>``.
"""

import math

import pytest
import torch

from torchrec_tt import PoolingMode, TTEmbeddingBagConfig, Variant, count_ops, tt_embedding_bag, tt_to_dense
from torchrec_tt.ops import uses_extension
from tt_testing import OP_ERRORS, assert_message, embedding_bag_ref, random_cores

P, Q, RANKS = [3, 4, 5], [2, 1, 2], [2, 3]  # 60 rows, dim 4


def _batch(device="cpu", dtype=torch.int64):
    indices = torch.tensor([0, 59, 7, 7, 8, 30], dtype=dtype, device=device)
    offsets = torch.tensor([0, 2, 2, 6], dtype=dtype, device=device)
    return indices, offsets


def _cores(device="cpu", dtype=torch.float64):
    return random_cores(P, Q, RANKS, dtype=dtype, device=device, generator=torch.Generator().manual_seed(0))


def _check(patterns, cores, indices, offsets, psw=None, variant="grt", pooling="sum"):
    with pytest.raises(OP_ERRORS) as excinfo:
        tt_embedding_bag(cores, indices, offsets, psw, pooling=pooling, variant=variant)
    assert_message(excinfo, *patterns)


VARIANTS = ["tt", "grt"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [60, 77, -3, -1])
def test_index_out_of_range(bad, index_dtype, variant):
    indices, offsets = _batch(dtype=index_dtype)
    indices[4] = bad
    _check([r"^tt_embedding_bag: indices\[4\] must be in \[0, 60\), got " + str(bad) + "$"], _cores(), indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_offsets_not_monotone(variant):
    indices, _ = _batch()
    offsets = torch.tensor([0, 4, 2, 6])
    _check([r"offsets must be non-decreasing, got offsets\[1\] = 4 > offsets\[2\] = 2"], _cores(), indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("last", [5, 9])
def test_last_offset_not_num_indices(last, variant):
    indices, _ = _batch()
    offsets = torch.tensor([0, 2, 2, last])
    _check([rf"offsets\[-1\] \(offsets\[3\]\) must equal indices.numel\(\) = 6, got {last}$"], _cores(), indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_offset_not_zero(variant):
    indices, _ = _batch()
    offsets = torch.tensor([1, 2, 2, 6])
    _check([r"offsets\[0\] must be 0", r"got 1"], _cores(), indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_offsets(variant):
    _check([r"offsets", r"B \+ 1|empty|entries"], _cores(), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("float_dtype", [torch.float32, torch.float64])
def test_float_indices(float_dtype, variant):
    indices, offsets = _batch()
    _check([r"indices must be int32 or int64", r"float32|float64|Float|Double"], _cores(), indices.to(float_dtype), offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_offsets(variant):
    """Float offsets are rejected, not silently truncated to integers."""
    indices, _ = _batch()
    offsets = torch.tensor([0.0, 2.5, 2.5, 6.0])
    _check([r"offsets", r"float32|Float"], _cores(), indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_2d_indices(variant):
    indices, offsets = _batch()
    _check([r"indices must be 1-D"], _cores(), indices.reshape(2, 3), offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [5, 7])
def test_per_sample_weights_wrong_shape(size, variant):
    indices, offsets = _batch()
    psw = torch.ones(size, dtype=torch.float64)
    _check([r"per_sample_weights", r"\b6\b", rf"\b{size}\b"], _cores(), indices, offsets, psw, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_sample_weights_2d(variant):
    indices, offsets = _batch()
    psw = torch.ones(6, 1, dtype=torch.float64)
    _check([r"per_sample_weights", r"6, 1"], _cores(), indices, offsets, psw, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_sample_weights_wrong_dtype(variant):
    indices, offsets = _batch()
    psw = torch.ones(6, dtype=torch.float32)
    _check([r"per_sample_weights", r"float32|Float"], _cores(), indices, offsets, psw, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cores_rank_mismatch(variant):
    cores = _cores()
    cores[1] = torch.randn(4, 3, 1, 3, dtype=torch.float64)  # R[1] should be 2
    indices, offsets = _batch()
    _check([r"^tt_embedding_bag: rank mismatch: cores\[1\]\.size\(1\) must equal cores\[0\]\.size\(3\) = 2, got 3$"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_wrong_ndim(variant):
    cores = _cores()
    cores[1] = cores[1].reshape(4, 2, 3)
    indices, offsets = _batch()
    _check([r"cores\[1\] must be 4-D", r"4, 2, 3"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_boundary_rank(variant):
    cores = _cores()
    cores[0] = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    indices, offsets = _batch()
    _check([r"^tt_embedding_bag: cores\[0\]\.size\(1\) \(R\[0\]\) must be 1, got 5$"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_boundary_rank(variant):
    cores = _cores()
    cores[2] = torch.randn(5, 3, 2, 7, dtype=torch.float64)
    indices, offsets = _batch()
    _check([r"^tt_embedding_bag: cores\[2\]\.size\(3\) \(R\[d\]\) must be 1, got 7$"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("num_cores", [1, 5])
def test_number_of_cores(num_cores, variant):
    cores = random_cores([2] * num_cores, [1] * num_cores, [1] * (num_cores - 1))
    indices, offsets = _batch()
    indices.clamp_(max=1)
    _check([rf"^tt_embedding_bag: cores must hold 2 to 4 cores, got {num_cores}$"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cores_mixed_dtypes(variant):
    cores = _cores()
    cores[2] = cores[2].float()
    indices, offsets = _batch()
    _check([r"^tt_embedding_bag: cores\[2\] must have the dtype of cores\[0\] \((torch\.float64|Double)\), got (torch\.float32|Float)$"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_integer_cores(variant):
    cores = [c.to(torch.int64) for c in _cores()]
    indices, offsets = _batch()
    _check([r"cores", r"int64|Long"], cores, indices, offsets, variant=variant)


def test_bad_pooling_and_variant_names():
    indices, offsets = _batch()
    with pytest.raises(ValueError, match=r"pooling.*'max'"):
        tt_embedding_bag(_cores(), indices, offsets, pooling="max")
    with pytest.raises(ValueError, match=r"variant.*'fast'"):
        tt_embedding_bag(_cores(), indices, offsets, variant="fast")


def test_bad_input_leaves_cores_untouched():
    """CPU checks index values before any work (CUDA only checks them behind an opt-in)."""
    cores = [c.requires_grad_(True) for c in _cores()]
    before = [c.detach().clone() for c in cores]
    indices, offsets = _batch()
    indices[1] = 1000
    with pytest.raises(OP_ERRORS, match="1000"):
        tt_embedding_bag(cores, indices, offsets).sum().backward()
    assert all(c.grad is None for c in cores)
    for c, b in zip(cores, before):
        assert torch.equal(c.detach(), b)


# ---------------------------------------------------------------------------------------
# Issue 10 (part A): every bad input gets a ValueError naming the argument and the value.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_per_sample_weights_rejected(bad, pooling, variant):
    """nn.EmbeddingBag gives inf for an inf weight; TT's reassociated sums would give NaN: rejected."""
    indices, offsets = _batch()
    psw = torch.ones(6, dtype=torch.float64)
    psw[3] = bad
    with pytest.raises(ValueError) as excinfo:
        tt_embedding_bag(_cores(), indices, offsets, psw, pooling=pooling, variant=variant)
    assert_message(excinfo, rf"^tt_embedding_bag: per_sample_weights\[3\] must be finite, got {bad}$")


@pytest.mark.parametrize("variant", list(Variant))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_int32_ids_on_a_table_of_more_than_2_31_rows(index_dtype, variant):
    """2.5e9 rows: int32 ids up to 2^31 - 1 are valid (no int32 compare that wraps)."""
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(50_000, 1, 2, 3, generator=gen, dtype=torch.float64),
             torch.randn(50_000, 3, 2, 1, generator=gen, dtype=torch.float64)]
    ids = [2**31 - 1, 5, 2**31 - 1, 1_999_999_999]
    indices = torch.tensor(ids, dtype=index_dtype)
    offsets = torch.tensor([0, 1, 4], dtype=index_dtype)
    out = tt_embedding_bag(cores, indices, offsets, variant=variant)
    rows = [(cores[0][i // 50_000, 0] @ cores[1][i % 50_000, :, :, 0]).reshape(-1) for i in ids]
    torch.testing.assert_close(out, torch.stack([rows[0], rows[1] + rows[2] + rows[3]]))
    indices[2] = -7
    with pytest.raises(ValueError) as excinfo:
        tt_embedding_bag(cores, indices, offsets, variant=variant)
    assert_message(excinfo, r"^tt_embedding_bag: indices\[2\] must be in \[0, 2500000000\), got -7$")


def test_enums_and_strings_give_the_same_result():
    indices, offsets = _batch()
    cores = _cores()
    for variant, pooling in [(Variant.TT, PoolingMode.SUM), (Variant.GRT, PoolingMode.MEAN)]:
        by_enum = tt_embedding_bag(cores, indices, offsets, pooling=pooling, variant=variant)
        by_name = tt_embedding_bag(cores, indices, offsets, pooling=str(pooling), variant=str(variant).upper())
        torch.testing.assert_close(by_enum, by_name, rtol=0, atol=0)
        torch.testing.assert_close(by_enum, embedding_bag_ref(cores, indices, offsets, pooling=str(pooling)))
    assert (int(Variant.TT), int(Variant.GRT), int(PoolingMode.SUM), int(PoolingMode.MEAN)) == (0, 1, 0, 1)


@pytest.mark.parametrize("argument, value", [("pooling", 2), ("variant", -1), ("variant", True), ("pooling", None)])
def test_bad_mode_values(argument, value):
    indices, offsets = _batch()
    with pytest.raises(ValueError) as excinfo:
        tt_embedding_bag(_cores(), indices, offsets, **{argument: value})
    assert_message(excinfo, rf"^tt_embedding_bag: {argument} must be one of \[.*\] \(or \w+\), got {value!r}$")


@pytest.mark.skipif(not uses_extension(torch.device("cpu")), reason="the compiled CPU op is not built")
@pytest.mark.parametrize("pooling_mode, variant, pattern", [
    (2, 0, r"pooling_mode must be 0 \(PoolingMode.SUM\) or 1 \(PoolingMode.MEAN\), got 2"),
    (0, 5, r"variant must be 0 \(Variant.TT\) or 1 \(Variant.GRT\), got 5"),
])
def test_compiled_op_rejects_bad_mode_ints_with_value_error(pooling_mode, variant, pattern):
    indices, offsets = _batch()
    with pytest.raises(ValueError, match=pattern):
        torch.ops.torchrec_tt.tt_embedding_bag(_cores(), indices, offsets, None, pooling_mode, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weighted", [False, True])
def test_public_op_on_meta_tensors(variant, weighted):
    """No value reads on meta: shapes come out, and shape checks still apply."""
    cores = [c.to("meta") for c in _cores()]
    indices, offsets = (t.to("meta") for t in _batch())
    psw = torch.empty(6, dtype=torch.float64, device="meta") if weighted else None
    out = tt_embedding_bag(cores, indices, offsets, psw, variant=variant)
    assert out.device.type == "meta" and out.shape == (3, 4) and out.dtype == torch.float64
    with pytest.raises(ValueError) as excinfo:
        tt_embedding_bag(cores, indices.reshape(2, 3), offsets, variant=variant)
    assert_message(excinfo, r"indices must be 1-D, got shape \(2, 3\)")
    with pytest.raises(ValueError) as excinfo:
        tt_embedding_bag(cores, indices, offsets, torch.empty(5, dtype=torch.float64, device="meta"), variant=variant)
    assert_message(excinfo, r"per_sample_weights must have shape \(6,\), got \(5,\)")


def _count_config():
    return TTEmbeddingBagConfig(name="counted", num_embeddings=50, embedding_dim=4, feature_names=["f"],
                                tt_p_shapes=[6, 9], tt_q_shapes=[2, 2], tt_ranks=[3])


@pytest.mark.parametrize("bad", [50, 53, -1])  # 50..53 are padding rows of prod(p) = 54
def test_count_ops_rejects_out_of_range_ids(bad):
    indices = torch.tensor([1, 2, bad, 4])
    with pytest.raises(ValueError) as excinfo:
        count_ops(_count_config(), indices, torch.tensor([0, 2, 4]))
    assert_message(excinfo, rf"^count_ops: table 'counted': indices\[2\] must be in \[0, num_embeddings=50\), got {bad}$")


def test_count_ops_rejects_bad_offsets():
    with pytest.raises(ValueError) as excinfo:
        count_ops(_count_config(), torch.tensor([1, 2, 3]), torch.tensor([0, 2, 5]))
    assert_message(excinfo, r"^count_ops: table 'counted': group_plan: offsets\[-1\] \(offsets\[2\]\) must equal indices.numel\(\) = 3, got 5$")
    with pytest.raises(ValueError) as excinfo:
        count_ops(_count_config(), torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))
    assert_message(excinfo, r"count_ops: table 'counted': indices must be a 1-D int32 or int64 tensor, got torch.float32")


@pytest.mark.parametrize("num_rows", [61, -1, 2.5, True])
def test_tt_to_dense_rejects_bad_row_counts(num_rows):
    with pytest.raises(ValueError) as excinfo:
        tt_to_dense(_cores(), num_rows)
    assert_message(excinfo, rf"^tt_to_dense: num_rows must be an int in \[0, prod\(m_k\) = 60\], got {num_rows!r}$")


def test_tt_to_dense_row_counts_in_range():
    full = tt_to_dense(_cores())
    assert full.shape == (60, 4) and tt_to_dense(_cores(), 0).shape == (0, 4)
    torch.testing.assert_close(tt_to_dense(_cores(), 17), full[:17])
    assert math.prod(P) == 60


def _parity_cases():
    indices, offsets = _batch()
    cores = _cores()
    out_of_range, negative = indices.clone(), indices.clone()
    out_of_range[2], negative[5] = 60, -4
    bad_rank = list(cores)
    bad_rank[2] = torch.zeros(5, 4, 2, 1, dtype=torch.float64)
    bad_r0 = list(cores)
    bad_r0[0] = torch.zeros(3, 2, 2, 2, dtype=torch.float64)
    return {
        "index_high": (cores, out_of_range, offsets),
        "index_negative": (cores, negative, offsets),
        "offsets_first": (cores, indices, torch.tensor([1, 2, 2, 6])),
        "offsets_last": (cores, indices, torch.tensor([0, 2, 2, 7])),
        "offsets_decreasing": (cores, indices, torch.tensor([0, 3, 2, 6])),
        "offsets_empty": (cores, indices, offsets[:0]),
        "rank_mismatch": (bad_rank, indices, offsets),
        "first_rank": (bad_r0, indices, offsets),
        "num_cores": (cores[:1], indices, offsets),
    }


@pytest.mark.skipif(not uses_extension(torch.device("cpu")), reason="the compiled CPU op is not built")
@pytest.mark.parametrize("case", list(_parity_cases()))
@pytest.mark.parametrize("variant", list(Variant), ids=str)
def test_compiled_and_python_ops_raise_the_same_error(case, variant):
    """One exception type and one message, whichever implementation runs."""
    from torchrec_tt import _python_ops

    cores, indices, offsets = _parity_cases()[case]
    with pytest.raises(ValueError) as compiled:
        torch.ops.torchrec_tt.tt_embedding_bag(cores, indices, offsets, None, int(PoolingMode.SUM), int(variant))
    with pytest.raises(ValueError) as python:
        _python_ops.tt_embedding_bag_python(cores, indices, offsets, None, PoolingMode.SUM, variant)
    assert type(compiled.value) is type(python.value) is ValueError
    assert str(compiled.value) == str(python.value)
