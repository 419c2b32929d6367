"""Pure-PyTorch implementation of the ``torchrec_tt`` ops (same contract as ``csrc/``).

Used when the C++ extension is not built, and as a second opinion in tests. The
``grt`` forward is written with differentiable tensor ops, so autograd through it is
exactly the GRT backward of DESIGN §1: gradients of the prefixes are reduced per
distinct group and pushed through the prefix chain once per group.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch

from torchrec_tt.grouping import bag_ids, decompose_indices, group_plan_python

from torchrec_tt.enums import PoolingMode, Variant

# Aliases of the enum members (the ops take their int values).
POOLING_SUM, POOLING_MEAN = PoolingMode.SUM, PoolingMode.MEAN
VARIANT_TT, VARIANT_GRT = Variant.TT, Variant.GRT
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def is_tracing(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the call is being traced: ``torch.compile``/``torch.export`` (strict or not), or
    fake tensors or ``torch.fx`` proxies among ``tensors``. Constant-folded by Dynamo (checked
    first), so callers can branch on it without a graph break."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    for t in tensors:
        if isinstance(t, torch.fx.Proxy) or (t is not None and is_fake(t)):
            return True
    return False


def reads_values(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether checks may read the values of ``tensors``: not on ``meta``, not traced (fake
    tensors, fx proxies, ``torch.compile``/``torch.export``)."""
    if is_tracing(*tensors):
        return False
    return not any(t is not None and t.device.type == "meta" for t in tensors)


def first_out_of_range(values: torch.Tensor, low: int, high: Optional[int]) -> Optional[Tuple[int, int]]:
    """``(position, value)`` of the first entry of an integer tensor outside ``[low, high)``.

    Compares in int64 (an int32 tensor compared with a bound past 2^31 - 1 would wrap) and
    skips a bound the dtype cannot reach. ``high=None``: no upper bound.
    """
    if values.numel() == 0:
        return None
    # One reduction (and on CUDA one host read) when every entry is in range, the common case: the
    # masks below cost 70-100 us per 46k ids on the CPU machine, torch.aminmax 9-13.
    low_seen, high_seen = torch.stack(torch.aminmax(values)).tolist()
    if low_seen >= low and (high is None or high_seen < high):
        return None
    info = torch.iinfo(values.dtype) if not values.is_floating_point() else None
    bad = torch.zeros_like(values, dtype=torch.bool)
    if info is None or low > info.min:
        bad |= values < low
    if high is not None and (info is None or high <= info.max):
        bad |= values >= high
    if not bool(bad.any()):
        return None
    k = int(torch.nonzero(bad)[0])
    return k, int(values[k])


def first_non_finite(values: torch.Tensor) -> Optional[Tuple[int, float]]:
    """``(position, value)`` of the first NaN or infinity in a float tensor."""
    if values.numel() == 0:
        return None
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return None
    k = int(torch.nonzero(bad.reshape(-1))[0])
    return k, float(values.reshape(-1)[k])


def check_per_sample_weights_finite(op: str, per_sample_weights: Optional[torch.Tensor], argument: str = "per_sample_weights") -> None:
    """Reject NaN/inf weights: TT reassociates the sums, so inf cannot give ``nn.EmbeddingBag``'s inf."""
    if per_sample_weights is None or not per_sample_weights.is_floating_point() or not reads_values(per_sample_weights):
        return
    bad = first_non_finite(per_sample_weights)
    if bad is not None:
        raise ValueError(f"{op}: {argument}[{bad[0]}] must be finite, got {bad[1]}")


def check_index_values(op: str, indices: torch.Tensor, offsets: torch.Tensor, num_rows: Optional[int]) -> None:
    """Value checks of 1-D ``indices``/``offsets`` (as ``checks.h``): offsets run from 0 to
    ``indices.numel()`` without decreasing; indices in ``[0, num_rows)`` (``None``: only >= 0)."""
    if not reads_values(indices, offsets):
        return
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"{op}: offsets[0] must be 0, got {first}")
    if last != indices.numel():
        raise ValueError(f"{op}: offsets[-1] (offsets[{offsets.numel() - 1}]) must equal indices.numel() = {indices.numel()}, got {last}")
    steps = offsets[1:] - offsets[:-1]
    if steps.numel() and int(steps.min()) < 0:
        k = int(torch.nonzero(steps < 0)[0])
        raise ValueError(
            f"{op}: offsets must be non-decreasing, got offsets[{k}] = {int(offsets[k])} > offsets[{k + 1}] = {int(offsets[k + 1])}"
        )
    bad = first_out_of_range(indices, 0, num_rows)
    if bad is not None:
        expected = ">= 0" if num_rows is None else f"in [0, {num_rows})"
        raise ValueError(f"{op}: indices[{bad[0]}] must be {expected}, got {bad[1]}")


def check_inputs(
    op: str,
    cores: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    pooling_mode: int,
    variant: int,
) -> None:
    """The op-boundary checks of ``csrc/`` (same conditions, ``ValueError``), plus finite weights.

    Values are not read on ``meta`` or fake tensors (only shapes, dtypes and devices are checked).
    """

    def fail(msg: str) -> None:
        raise ValueError(f"{op}: {msg}")

    if not 2 <= len(cores) <= 4:
        fail(f"cores must hold 2 to 4 cores, got {len(cores)}")
    for k, core in enumerate(cores):
        if not isinstance(core, torch.Tensor):
            fail(f"cores[{k}] must be a tensor, got {type(core).__name__}")
        if core.dim() != 4:
            fail(f"cores[{k}] must be 4-D (m_k, R[k], n_k, R[k+1]), got shape {tuple(core.shape)}")
        if core.dtype != cores[0].dtype:
            fail(f"cores[{k}] must have the dtype of cores[0] ({cores[0].dtype}), got {core.dtype}")
        if core.device != cores[0].device:
            fail(f"cores[{k}] must be on the device of cores[0] ({cores[0].device}), got {core.device}")
        if min(core.shape) < 1:
            fail(f"cores[{k}] must have positive sizes, got shape {tuple(core.shape)}")
    if cores[0].dtype not in _FLOAT_DTYPES:
        fail(f"cores must be float32, float64, float16 or bfloat16, got cores[0] of dtype {cores[0].dtype}")
    ranks = [c.size(1) for c in cores] + [cores[-1].size(3)]
    for k in range(len(cores) - 1):
        if cores[k].size(3) != cores[k + 1].size(1):
            fail(f"rank mismatch: cores[{k + 1}].size(1) must equal cores[{k}].size(3) = {cores[k].size(3)}, got {cores[k + 1].size(1)}")
    if ranks[0] != 1:
        fail(f"cores[0].size(1) (R[0]) must be 1, got {ranks[0]}")
    if ranks[-1] != 1:
        fail(f"cores[{len(cores) - 1}].size(3) (R[d]) must be 1, got {ranks[-1]}")
    for name, t in (("indices", indices), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1:
            fail(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.dtype not in _INDEX_DTYPES:
            fail(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != cores[0].device:
            fail(f"{name} must be on the cores' device {cores[0].device}, got {t.device}")
    if indices.dtype != offsets.dtype:
        fail(f"offsets must have the dtype of indices ({indices.dtype}), got {offsets.dtype}")
    if offsets.numel() == 0:
        fail("offsets must have B + 1 >= 1 entries, got 0")
    if per_sample_weights is not None:
        if per_sample_weights.shape != indices.shape:
            fail(f"per_sample_weights must have shape {tuple(indices.shape)}, got {tuple(per_sample_weights.shape)}")
        if per_sample_weights.dtype != cores[0].dtype:
            fail(f"per_sample_weights must be {cores[0].dtype}, got {per_sample_weights.dtype}")
        if per_sample_weights.device != cores[0].device:
            fail(f"per_sample_weights must be on {cores[0].device}, got {per_sample_weights.device}")
    PoolingMode.parse(pooling_mode, op, "pooling_mode")
    Variant.parse(variant, op)
    if not reads_values(indices, offsets, per_sample_weights, *cores):
        return
    check_index_values(op, indices, offsets, math.prod(c.size(0) for c in cores))
    check_per_sample_weights_finite(op, per_sample_weights)


def lookup_coefficients(
    offsets: torch.Tensor,
    num_lookups: int,
    per_sample_weights: Optional[torch.Tensor],
    pooling_mode: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(L,)`` coefficient ``c_j = w_j * (1 / L_b if mean else 1)`` of every lookup."""
    bags = bag_ids(offsets, num_lookups)
    coeff = (
        per_sample_weights
        if per_sample_weights is not None
        else torch.ones(num_lookups, dtype=dtype, device=offsets.device)
    )
    if pooling_mode == POOLING_MEAN:
        lengths = (offsets[1:] - offsets[:-1]).to(dtype).clamp_min(1)
        coeff = coeff / lengths[bags]
    return coeff


def prefix_products(cores: Sequence[torch.Tensor], digits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chains ``core_0[i_0] ⋯ core_{k}[i_k]`` for the given digits.

    Returns ``(G, n_0 ⋯ n_k, R[k + 1])``.
    """
    count = digits[0].numel()
    acc = cores[0][digits[0]].reshape(count, cores[0].size(2), cores[0].size(3))
    for core, digit in zip(cores[1:], digits[1:]):
        m, r_in, n, r_out = core.shape
        acc = torch.bmm(acc, core[digit].reshape(count, r_in, n * r_out)).reshape(count, -1, r_out)
    return acc


def tt_embedding_bag_python(
    cores: List[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    pooling_mode: int,
    variant: int,
) -> torch.Tensor:
    """Pooled TT embedding bags, ``(B, N)``; differentiable w.r.t. cores and weights."""
    check_inputs("tt_embedding_bag", cores, indices, offsets, per_sample_weights, pooling_mode, variant)
    num_bags, num_lookups = offsets.numel() - 1, indices.numel()
    dim = math.prod(c.size(2) for c in cores)
    coeff = lookup_coefficients(offsets, num_lookups, per_sample_weights, pooling_mode, cores[0].dtype)
    out = cores[0].new_zeros(num_bags, dim)
    if num_lookups == 0 or "meta" in (indices.device.type, cores[0].device.type):
        # On meta: the output's shape only (grouping reads values). Keep the graph connected so backward yields zero gradients, not None.
        connected = out + 0 * sum(c.sum() for c in cores)
        return connected if per_sample_weights is None else connected + 0 * per_sample_weights.sum()
    p_shapes = [c.size(0) for c in cores]
    if variant == VARIANT_TT:
        rows = prefix_products(cores, decompose_indices(indices, p_shapes)).reshape(num_lookups, dim)
        return out.index_add(0, bag_ids(offsets, num_lookups), rows * coeff[:, None])
    last = cores[-1]
    plan = group_plan_python(indices, offsets, last.size(0))
    prefix = prefix_products(cores[:-1], decompose_indices(plan.slot_group, p_shapes[:-1]))
    last_slices = last[indices.to(torch.int64) % last.size(0)].reshape(num_lookups, last.size(1), last.size(2))
    # Intra-group reduce: S[s] = sum over the lookups j of segment s of c_j * G_d[i_d(j)].
    reduced = last_slices.new_zeros(plan.num_segments, last.size(1), last.size(2)).index_add(
        0, plan.lookup_segment, last_slices * coeff[:, None, None]
    )
    per_segment = torch.bmm(prefix[plan.segment_slot], reduced).reshape(plan.num_segments, dim)
    return out.index_add(0, plan.segment_bag, per_segment)  # inter-group reduce


def tt_embedding_bag_backward_python(
    grad_output: torch.Tensor,
    cores: List[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    pooling_mode: int,
    variant: int,
    per_sample_weights_requires_grad: bool,
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`tt_embedding_bag_python`: ``(core_grads, psw_grad)``.

    ``psw_grad`` is ``(L,)`` when requested, else an empty tensor.
    """
    with torch.enable_grad():
        leaves = [c.detach().requires_grad_(True) for c in cores]
        weights = per_sample_weights
        if weights is not None:
            weights = weights.detach().requires_grad_(per_sample_weights_requires_grad)
        out = tt_embedding_bag_python(leaves, indices, offsets, weights, pooling_mode, variant)
        inputs = leaves + ([weights] if per_sample_weights_requires_grad else [])
        grads = torch.autograd.grad(out, inputs, grad_output, allow_unused=True)
    core_grads = [g if g is not None else torch.zeros_like(c) for g, c in zip(grads, cores)]
    psw_grad = cores[0].new_empty(0)
    if per_sample_weights_requires_grad:
        psw_grad = grads[-1] if grads[-1] is not None else torch.zeros_like(per_sample_weights)
    return core_grads, psw_grad
