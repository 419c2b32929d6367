"""TT-core initialization and conversion between dense tables and TT cores."""

import math
from typing import List, Optional, Sequence

import torch

from torchrec_tt.tt_shapes import MAX_CORES, MIN_CORE_BYTES_LIMIT, MIN_CORES, full_ranks, tt_core_shapes

# Rows of the dense table handled per step by the chunked conversions (bounds the
# extra memory of ``from_dense`` to a few chunks, never a second full table).
_CHUNK_ELEMENTS = 1 << 24


def _check_finite(weight: torch.Tensor) -> None:
    """``ValueError`` naming the first NaN/inf entry; reads ``weight`` in row chunks."""
    if weight.device.type == "meta":
        return
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.size(1)))
    for start in range(0, weight.size(0), rows):
        bad = ~torch.isfinite(weight[start : start + rows])
        if bool(bad.any()):
            r, c = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(f"from_dense: weight must be finite, got weight[{start + r}, {c}] = {float(weight[start + r, c])}")


@torch.no_grad()
def sampled_init_(cores: Sequence[torch.Tensor], row_variance: float, generator: Optional[torch.Generator] = None) -> None:
    """TT-Rec sampled Gaussian init, in place.

    Every reconstructed entry is a sum over ``prod(inner ranks)`` rank paths of a
    product of ``d`` independent N(0, s²) factors, so its variance is
    ``prod(inner ranks) * s^(2d)``. Choosing ``s`` so that this equals
    ``row_variance`` gives rows the spread of the uncompressed init.
    """
    paths = math.prod(c.size(3) for c in cores[:-1])
    std = (row_variance / paths) ** (1.0 / (2 * len(cores)))
    for core in cores:
        if core.device.type != "meta":
            core.normal_(0.0, std, generator=generator)


@torch.no_grad()
def uniform_like_init_(
    cores: Sequence[torch.Tensor],
    low: float,
    high: float,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Init whose rows have the mean and variance of TorchRec's ``U(low, high)`` init, in place.

    With ``low == -high`` this is :func:`sampled_init_`. Otherwise rank path 0 carries the
    mean: core ``k`` is block diagonal over its ranks, ``core[:, 0, :, 0] = c_k`` with
    ``prod(c_k) = (low + high) / 2``, and the other blocks are the sampled init over the
    remaining ``prod(R[k] - 1)`` paths with variance ``(high - low)^2 / 12``. Every entry of
    every row is then ``(low + high) / 2 + Z`` with ``E[Z] = 0``, ``Var[Z] = (high - low)^2 / 12``
    exactly in distribution; ``Z`` is a sum of products of Gaussians, so (unlike ``U``) it is
    not bounded by ``[low, high]`` (about 90% of the entries fall inside). Needs every inner
    rank >= 2 when ``low != -high``.
    """
    mean, variance = (low + high) / 2.0, (high - low) ** 2 / 12.0
    if mean == 0.0 or all(c.device.type == "meta" for c in cores):
        sampled_init_(cores, variance, generator)
        return
    ranks = [c.size(3) for c in cores[:-1]]
    if min(ranks) < 2:
        raise ValueError(f"uniform_like_init_: an init range not centred on 0 needs inner ranks >= 2, got {ranks}")
    d = len(cores)
    paths = math.prod(r - 1 for r in ranks)
    std = (variance / paths) ** (1.0 / (2 * d)) if variance > 0 else 0.0
    scale = abs(mean) ** (1.0 / d)
    for k, core in enumerate(cores):
        core.zero_()
        core[:, 1 if k > 0 else 0 :, :, 1 if k < d - 1 else 0 :].normal_(0.0, std, generator=generator)
        core[:, 0, :, 0] = scale * (-1.0 if (k == 0 and mean < 0) else 1.0)


def tt_to_dense(cores: Sequence[torch.Tensor], num_rows: Optional[int] = None) -> torch.Tensor:
    """Materialize the table: ``(num_rows, prod(n_k))`` (default ``prod(m_k)`` rows).

    Contracts whole cores (not row chains), so it is independent of the lookup kernels
    and serves as their reference.

    Raises:
        ValueError: bad cores, or ``num_rows`` not an int in ``[0, prod(m_k)]``.
    """
    cores = list(cores)
    if not MIN_CORES <= len(cores) <= MAX_CORES:
        raise ValueError(f"tt_to_dense: cores must hold {MIN_CORES} to {MAX_CORES} cores, got {len(cores)}")
    for k, core in enumerate(cores):
        if not isinstance(core, torch.Tensor) or core.dim() != 4:
            shape = tuple(core.shape) if isinstance(core, torch.Tensor) else type(core).__name__
            raise ValueError(f"tt_to_dense: cores[{k}] must be a 4-D tensor (m, r_in, n, r_out), got {shape}")
        if not core.is_floating_point():
            raise ValueError(f"tt_to_dense: cores[{k}] must be floating point, got {core.dtype}")
        expected_in = 1 if k == 0 else cores[k - 1].size(3)
        if core.size(1) != expected_in:
            raise ValueError(f"tt_to_dense: cores[{k}].size(1) must be {expected_in}, got {core.size(1)}")
    if cores[-1].size(3) != 1:
        raise ValueError(f"tt_to_dense: cores[{len(cores) - 1}].size(3) must be 1, got {cores[-1].size(3)}")
    total_rows = math.prod(c.size(0) for c in cores)
    if num_rows is not None and (
        not isinstance(num_rows, int) or isinstance(num_rows, bool) or not 0 <= num_rows <= total_rows
    ):
        raise ValueError(f"tt_to_dense: num_rows must be an int in [0, prod(m_k) = {total_rows}], got {num_rows!r}")
    full = cores[0].squeeze(1)  # (m_0, n_0, R[1])
    for core in cores[1:]:
        m, r_in, n, r_out = core.shape
        full = torch.einsum("abr,crdq->acbdq", full, core).reshape(full.size(0) * m, full.size(1) * n, r_out)
    full = full.squeeze(-1)
    return full if num_rows is None else full[:num_rows]


@torch.no_grad()
def from_dense(
    weight: torch.Tensor,
    p_shapes: Sequence[int],
    q_shapes: Sequence[int],
    ranks: Sequence[int],
) -> List[torch.Tensor]:
    """TT-SVD of a dense ``(M, N)`` table into cores of the given shapes and inner ranks.

    The first (largest) unfolding is never formed: its Gram matrix and its projection
    onto the leading singular vectors are accumulated over row chunks, so the extra
    memory is ``R[1] / (m_0 n_0)`` of the table plus a chunk. The remaining steps are a
    plain TT-SVD of that much smaller tensor. Truncated ranks are zero-padded up to
    ``ranks`` so the cores match the config; rows past ``M`` count as zeros.

    Returns:
        ``d`` cores, core ``k`` of shape ``(m_k, R[k], n_k, R[k+1])``.

    Raises:
        ValueError: ``weight`` not a 2-D floating tensor of finite values, shapes that do
            not fit it, or ranks whose cores would take more bytes than both ``weight`` and
            1 GiB (checked before anything is allocated).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"from_dense: weight must be a 2-D (rows, dim) tensor, got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"from_dense: weight must be floating point, got {weight.dtype}")
    for name, values in (("p_shapes", p_shapes), ("q_shapes", q_shapes), ("ranks", ranks)):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(f"from_dense: {name} must hold positive ints, got {list(values)}")
    if not MIN_CORES <= len(p_shapes) <= MAX_CORES or len(q_shapes) != len(p_shapes):
        raise ValueError(
            f"from_dense: p_shapes and q_shapes must have one length in [{MIN_CORES}, {MAX_CORES}], "
            f"got {list(p_shapes)} and {list(q_shapes)}"
        )
    num_rows, dim = weight.shape
    if num_rows == 0:
        raise ValueError(f"from_dense: weight must have at least one row, got shape {tuple(weight.shape)}")
    if math.prod(q_shapes) != dim:
        raise ValueError(f"from_dense: q_shapes {list(q_shapes)} multiply to {math.prod(q_shapes)}, weight has {dim} columns")
    if math.prod(p_shapes) < num_rows:
        raise ValueError(f"from_dense: p_shapes {list(p_shapes)} multiply to {math.prod(p_shapes)} < {num_rows} rows")
    if len(ranks) != len(p_shapes) - 1:
        raise ValueError(f"from_dense: expected {len(p_shapes) - 1} inner ranks, got {list(ranks)}")
    shapes = tt_core_shapes(p_shapes, q_shapes, ranks)
    core_bytes = sum(math.prod(shape) for shape in shapes) * weight.element_size()
    limit = max(weight.numel() * weight.element_size(), MIN_CORE_BYTES_LIMIT)
    if core_bytes > limit:
        raise ValueError(
            f"from_dense: ranks {list(ranks)} make cores of {core_bytes} bytes, more than the dense weight "
            f"({weight.numel() * weight.element_size()} bytes) and {MIN_CORE_BYTES_LIMIT} bytes; expected "
            f"cores of at most {limit} bytes"
        )
    _check_finite(weight)
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    m0, n0 = p_shapes[0], q_shapes[0]
    rows_per_digit, cols_rest = math.prod(p_shapes[1:]), dim // n0
    chunk = max(1, _CHUNK_ELEMENTS // (m0 * dim))

    def unfolded_chunks():
        """Columns ``[start, stop)`` of the first unfolding, ``(m_0 n_0, rows * N / n_0)``."""
        for start in range(0, rows_per_digit, chunk):
            rest = torch.arange(start, min(start + chunk, rows_per_digit), device=weight.device)
            rows = (torch.arange(m0, device=weight.device)[:, None] * rows_per_digit + rest).reshape(-1)
            block = weight[rows.clamp(max=num_rows - 1)].to(work_dtype)
            block = block * (rows < num_rows).to(work_dtype)[:, None]
            block = block.reshape(m0, rest.numel(), n0, cols_rest).permute(0, 2, 1, 3)
            yield block.reshape(m0 * n0, rest.numel() * cols_rest)

    gram = torch.zeros(m0 * n0, m0 * n0, dtype=work_dtype, device=weight.device)
    for block in unfolded_chunks():
        gram.addmm_(block, block.T)
    rank = min(ranks[0], m0 * n0)
    basis = torch.linalg.eigh(gram).eigenvectors.flip(-1)[:, :rank]  # leading eigenvectors
    reduced = torch.cat([(basis.T @ block).reshape(rank, -1, cols_rest) for block in unfolded_chunks()], dim=1)

    factors = [basis.reshape(m0, n0, rank).unsqueeze(0)]  # (R[0], m, n, R[1])
    d = len(p_shapes)
    # reduced is (r, i_1..i_{d-1}, j_1..j_{d-1}); interleave to (r, i_1, j_1, …).
    rest_shape = [rank, *p_shapes[1:], *q_shapes[1:]]
    order = [0] + [x for k in range(1, d) for x in (k, k + d - 1)]
    tail = reduced.reshape(rest_shape).permute(order).contiguous()
    prev = rank
    for k in range(1, d - 1):
        u, s, vh = torch.linalg.svd(tail.reshape(prev * p_shapes[k] * q_shapes[k], -1), full_matrices=False)
        r = min(ranks[k], s.numel())
        factors.append(u[:, :r].reshape(prev, p_shapes[k], q_shapes[k], r))
        tail = s[:r, None] * vh[:r]
        prev = r
    factors.append(tail.reshape(prev, p_shapes[-1], q_shapes[-1], 1))

    cores = []
    for factor, (m, r_in, n, r_out) in zip(factors, shapes):
        core = torch.zeros(m, r_in, n, r_out, dtype=weight.dtype, device=weight.device)
        f = factor.permute(1, 0, 2, 3)
        core[:, : f.size(1), :, : f.size(3)] = f.to(weight.dtype)
        cores.append(core)
    return cores
