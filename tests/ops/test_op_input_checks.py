"""Bad inputs at the op boundary raise ``ValueError`` naming the argument and the bad value.

The pure-PyTorch path and the compiled ops (``TORCH_CHECK_VALUE``) raise the same type;
messages follow ``<op>: <argument> <what was expected>, got <value>``.
"""

import pytest
import torch

from torchrec_tt import tt_embedding_bag
from tt_testing import OP_ERRORS, assert_message, random_cores

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
    _check([r"rank mismatch", r"cores\[0\]\.size\(3\) ?= ?2", r"cores\[1\]\.size\(1\) ?= ?3"], cores, indices, offsets, variant=variant)


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
    _check([r"R\[0\]", r"\b5\b"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_boundary_rank(variant):
    cores = _cores()
    cores[2] = torch.randn(5, 3, 2, 7, dtype=torch.float64)
    indices, offsets = _batch()
    _check([r"R\[d\]", r"\b7\b"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("num_cores", [1, 5])
def test_number_of_cores(num_cores, variant):
    cores = random_cores([2] * num_cores, [1] * num_cores, [1] * (num_cores - 1))
    indices, offsets = _batch()
    indices.clamp_(max=1)
    _check([r"2 to 4 cores", rf"got {num_cores}"], cores, indices, offsets, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cores_mixed_dtypes(variant):
    cores = _cores()
    cores[2] = cores[2].float()
    indices, offsets = _batch()
    _check([r"cores\[2\]", r"float32|Float"], cores, indices, offsets, variant=variant)


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
