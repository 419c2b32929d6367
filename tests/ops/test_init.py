"""Core initialization and dense <-> TT conversion (``sampled_init_``, ``from_dense``)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_tt import TTEmbeddingBag, TTEmbeddingBagConfig, from_dense, tt_to_dense
from torchrec_tt.tt_shapes import max_useful_ranks
from tt_testing import random_cores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rows, dim", [(20000, 16), (6000, 32)])
def test_sampled_init_matches_torchrec_uniform_variance(rows, dim, seed):
    """Reconstructed rows have the variance of TorchRec's U(-sqrt(1/M), sqrt(1/M)) init."""
    torch.manual_seed(seed)
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=dim, feature_names=["f"])
    weight = TTEmbeddingBag(cfg).full_weight()
    assert weight.shape == (rows, dim)
    torchrec_variance = (2 * math.sqrt(1 / rows)) ** 2 / 12
    assert float(weight.var()) == pytest.approx(torchrec_variance, rel=0.2)
    assert abs(float(weight.mean())) < 0.05 * math.sqrt(torchrec_variance)


def test_sampled_init_matches_torchrec_module():
    """Same check against a real torchrec EmbeddingBagCollection's initial weights."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    torch.manual_seed(0)
    rows, dim = 8000, 16
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=dim, feature_names=["f"])])
    dense_var = float(ebc.embedding_bags["t"].weight.detach().var())
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=dim, feature_names=["f"])
    tt_var = float(TTEmbeddingBag(cfg).full_weight().var())
    assert tt_var == pytest.approx(dense_var, rel=0.2)


@settings(deadline=None, max_examples=20)
@given(
    d=st.integers(2, 4),
    data=st.data(),
)
def test_from_dense_recovers_low_tt_rank_table(d, data):
    """A table made from TT cores (prod(p) == rows) is reproduced to 1e-10 at those ranks."""
    p = data.draw(st.lists(st.integers(2, 4), min_size=d, max_size=d))
    q = data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d))
    bounds = max_useful_ranks(p, q)
    ranks = [data.draw(st.integers(1, min(4, b))) for b in bounds]
    seed = data.draw(st.integers(0, 2**31 - 1))
    cores = random_cores(p, q, ranks, generator=torch.Generator().manual_seed(seed))
    weight = tt_to_dense(cores)
    new = from_dense(weight, p, q, ranks)
    assert [tuple(c.shape) for c in new] == [tuple(c.shape) for c in cores]
    assert all(c.dtype == torch.float64 for c in new)
    torch.testing.assert_close(tt_to_dense(new), weight, rtol=0, atol=1e-10 * max(1.0, float(weight.abs().max())))


@pytest.mark.parametrize(
    "p, q, rows",
    [([4, 5, 6], [2, 3, 2], 120), ([4, 5, 6], [2, 3, 2], 101), ([3, 4], [4, 2], 12), ([2, 3, 2, 3], [2, 1, 2, 2], 30)],
)
def test_from_dense_is_exact_at_max_ranks(p, q, rows):
    """A random full-rank table (with or without padding rows) is reproduced at the max ranks."""
    weight = torch.randn(rows, math.prod(q), dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    cores = from_dense(weight, p, q, max_useful_ranks(p, q))
    torch.testing.assert_close(tt_to_dense(cores, rows), weight, rtol=0, atol=1e-10)


def test_from_dense_truncation_error_decreases_with_rank():
    p, q = [4, 5, 6], [2, 3, 2]
    weight = torch.randn(110, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    bounds = max_useful_ranks(p, q)
    errors = []
    for r in [1, 2, 3, 4, 6, 8, 12]:
        ranks = [min(r, b) for b in bounds]
        errors.append(float((tt_to_dense(from_dense(weight, p, q, ranks), 110) - weight).norm()))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-9 * errors[0]  # max ranks: exact
    assert errors[0] > 0.5 * float(weight.norm())  # rank 1 loses most of a random table


def test_from_dense_float32():
    p, q, ranks = [3, 4, 5], [2, 2, 2], [3, 3]
    cores = random_cores(p, q, ranks, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    weight = tt_to_dense(cores)
    new = from_dense(weight, p, q, ranks)
    assert all(c.dtype == torch.float32 for c in new)
    torch.testing.assert_close(tt_to_dense(new), weight, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(p_shapes=[4, 5], q_shapes=[2, 4], ranks=[3]), r"q_shapes \[2, 4\] multiply to 8.*6 columns"),
        (dict(p_shapes=[4, 5], q_shapes=[2, 3], ranks=[3]), r"p_shapes \[4, 5\] multiply to 20 < 21 rows"),
        (dict(p_shapes=[3, 7], q_shapes=[2, 3], ranks=[3, 3]), r"expected 1 inner ranks, got \[3, 3\]"),
    ],
)
def test_from_dense_rejects_bad_shapes(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        from_dense(torch.zeros(21, 6, dtype=torch.float64), **kwargs)


def test_copy_from_dense_into_module():
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=50, embedding_dim=8, feature_names=["f"],
                               tt_p_shapes=[4, 4, 4], tt_q_shapes=[2, 2, 2], tt_ranks=[8, 8])
    bag = TTEmbeddingBag(cfg)
    weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    bag.copy_from_dense(weight)
    torch.testing.assert_close(bag.full_weight(), weight, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"table 't'.*\(49, 8\).*\(50, 8\)"):
        bag.copy_from_dense(weight[:49])


# Issue 10 (part A): bad input to from_dense gets a ValueError naming the argument and the value.


@pytest.mark.parametrize("bad, where", [(float("nan"), (3, 1)), (float("inf"), (0, 0)), (float("-inf"), (11, 5))])
def test_from_dense_rejects_non_finite_weights(bad, where):
    weight = torch.randn(12, 6, dtype=torch.float64)
    weight[where] = bad
    with pytest.raises(ValueError, match=rf"^from_dense: weight must be finite, got weight\[{where[0]}, {where[1]}\] = {bad}$"):
        from_dense(weight, [3, 4], [2, 3], [2])


@pytest.mark.parametrize("weight, got", [
    (torch.randn(12), r"\(12,\)"), (torch.randn(2, 3, 4), r"\(2, 3, 4\)"), ([[1.0, 2.0]], "list"),
])
def test_from_dense_rejects_non_2d_weights(weight, got):
    with pytest.raises(ValueError, match=rf"^from_dense: weight must be a 2-D \(rows, dim\) tensor, got {got}$"):
        from_dense(weight, [3, 4], [2, 3], [2])


def test_from_dense_rejects_integer_weights_and_bad_shapes():
    with pytest.raises(ValueError, match=r"^from_dense: weight must be floating point, got torch.int64$"):
        from_dense(torch.ones(12, 6, dtype=torch.int64), [3, 4], [2, 3], [2])
    with pytest.raises(ValueError, match=r"^from_dense: ranks must hold positive ints, got \[0\]$"):
        from_dense(torch.randn(12, 6), [3, 4], [2, 3], [0])
    with pytest.raises(ValueError, match=r"^from_dense: p_shapes and q_shapes must have one length .*got \[12\] and \[6\]$"):
        from_dense(torch.randn(12, 6), [12], [6], [])


def test_from_dense_rejects_ranks_too_large_before_allocating():
    """Ranks whose cores would need ~3 TB: a size check naming the ranks and the bytes, not an allocator error."""
    with pytest.raises(ValueError) as excinfo:
        from_dense(torch.randn(12, 6), [3, 4], [2, 3], [400_000_000])
    message = str(excinfo.value)
    cores = (3 * 1 * 2 * 400_000_000 + 4 * 400_000_000 * 3 * 1) * 4
    assert message.startswith("from_dense: ranks [400000000] make cores of "), message
    assert f"{cores} bytes" in message and "288 bytes" in message, message
