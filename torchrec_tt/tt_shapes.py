"""TT shape arithmetic: factorizations, core shapes and parameter counts.

A table of ``M`` rows and ``N`` dims is stored as ``d`` cores; core ``k`` has the
shape ``(m_k, R[k], n_k, R[k + 1])`` where ``p_shapes = [m_0, …, m_{d-1}]``
(``prod >= M``), ``q_shapes = [n_0, …, n_{d-1}]`` (``prod == N``) and the full rank
list is ``R = [1, r_1, …, r_{d-1}, 1]``.
"""

import math
from typing import List, Sequence, Tuple

MIN_CORES = 2
MAX_CORES = 4
# A TT table whose cores take more bytes than both its dense table and this is a mistake (ranks far
# too large): configs and from_dense reject it before anything is allocated.
MIN_CORE_BYTES_LIMIT = 1 << 30


def _prime_factors(n: int) -> List[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def _balanced_exact_factors(n: int, num_factors: int) -> List[int]:
    """Factors of ``n`` (exact product) that are as equal as possible."""
    buckets = [1] * num_factors
    # Largest primes first into the currently smallest bucket keeps the factors balanced.
    for p in sorted(_prime_factors(n), reverse=True):
        buckets[buckets.index(min(buckets))] *= p
    return sorted(buckets, reverse=True)


def _balanced_cover_factors(n: int, num_factors: int) -> List[int]:
    """Near-equal factors whose product is the smallest found that is ``>= n``."""
    factors, remaining = [], n
    for k in range(num_factors, 0, -1):
        f = max(1, math.ceil(round(remaining ** (1.0 / k), 9)))
        factors.append(f)
        remaining = math.ceil(remaining / f)
    return factors


def suggest_tt_shapes(
    num_embeddings: int, embedding_dim: int, num_cores: int = 3
) -> Tuple[List[int], List[int]]:
    """Balanced TT factorization of a ``(num_embeddings, embedding_dim)`` table.

    Returns ``(p_shapes, q_shapes)``: ``prod(p_shapes) >= num_embeddings`` (a few
    padding rows are allowed, never fewer rows) and ``prod(q_shapes) == embedding_dim``.

    Example::

        >>> suggest_tt_shapes(23100, 64)
        ([29, 29, 28], [4, 4, 4])
    """
    if not MIN_CORES <= num_cores <= MAX_CORES:
        raise ValueError(f"num_cores must be in [{MIN_CORES}, {MAX_CORES}], got {num_cores}")
    if num_embeddings < 1:
        raise ValueError(f"num_embeddings must be >= 1, got {num_embeddings}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    return (
        _balanced_cover_factors(num_embeddings, num_cores),
        _balanced_exact_factors(embedding_dim, num_cores),
    )


def full_ranks(inner_ranks: Sequence[int]) -> List[int]:
    """``[1, r_1, …, r_{d-1}, 1]`` from the inner ranks."""
    return [1, *inner_ranks, 1]


def max_useful_ranks(p_shapes: Sequence[int], q_shapes: Sequence[int]) -> List[int]:
    """Largest inner ranks that can still add expressiveness (TT-SVD bounds)."""
    sizes = [m * n for m, n in zip(p_shapes, q_shapes)]
    return [
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :]))
        for k in range(len(sizes) - 1)
    ]


def tt_core_shapes(
    p_shapes: Sequence[int], q_shapes: Sequence[int], inner_ranks: Sequence[int]
) -> List[Tuple[int, int, int, int]]:
    """Shapes ``(m_k, R[k], n_k, R[k+1])`` of the cores."""
    ranks = full_ranks(inner_ranks)
    return [(m, ranks[k], n, ranks[k + 1]) for k, (m, n) in enumerate(zip(p_shapes, q_shapes))]


def tt_num_params(
    p_shapes: Sequence[int], q_shapes: Sequence[int], inner_ranks: Sequence[int]
) -> int:
    """Number of scalars in all cores: ``sum_k m_k * R[k] * n_k * R[k+1]``."""
    return sum(math.prod(s) for s in tt_core_shapes(p_shapes, q_shapes, inner_ranks))
