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

POOLING_SUM, POOLING_MEAN = 0, 1
VARIANT_TT, VARIANT_GRT = 0, 1
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_inputs(
    op: str,
    cores: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    pooling_mode: int,
    variant: int,
) -> None:
    """The op-boundary checks of ``csrc/`` (same conditions, ``ValueError`` here)."""

    def fail(msg: str) -> None:
        raise ValueError(f"{op}: {msg}")

    if not 2 <= len(cores) <= 4:
        fail(f"expected 2 to 4 cores, got {len(cores)}")
    for k, core in enumerate(cores):
        if core.dim() != 4:
            fail(f"cores[{k}] must be 4-D (m, r_in, n, r_out), got shape {tuple(core.shape)}")
        if core.dtype != cores[0].dtype or core.device != cores[0].device:
            fail(f"cores[{k}] is {core.dtype} on {core.device}, cores[0] is {cores[0].dtype} on {cores[0].device}")
    if cores[0].dtype not in _FLOAT_DTYPES:
        fail(f"cores must be floating point, got {cores[0].dtype}")
    ranks = [c.size(1) for c in cores] + [cores[-1].size(3)]
    for k in range(len(cores) - 1):
        if cores[k].size(3) != cores[k + 1].size(1):
            fail(f"rank mismatch: cores[{k}].size(3)={cores[k].size(3)} != cores[{k + 1}].size(1)={cores[k + 1].size(1)}")
    if ranks[0] != 1 or ranks[-1] != 1:
        fail(f"boundary ranks must be 1, got R[0]={ranks[0]}, R[d]={ranks[-1]}")
    for name, t in (("indices", indices), ("offsets", offsets)):
        if t.dim() != 1:
            fail(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            fail(f"{name} must be int32 or int64, got {t.dtype}")
    if indices.dtype != offsets.dtype:
        fail(f"indices ({indices.dtype}) and offsets ({offsets.dtype}) must have the same dtype")
    if offsets.numel() == 0:
        fail("offsets must have B + 1 >= 1 entries, got 0")
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        fail(f"offsets[0] must be 0, got {first}")
    if last != indices.numel():
        fail(f"offsets[-1]={last} must equal the number of indices ({indices.numel()})")
    steps = offsets[1:] - offsets[:-1]
    if steps.numel() and int(steps.min()) < 0:
        k = int(torch.nonzero(steps < 0)[0])
        fail(f"offsets must be non-decreasing, got offsets[{k}]={int(offsets[k])} > offsets[{k + 1}]={int(offsets[k + 1])}")
    num_rows = math.prod(c.size(0) for c in cores)
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_rows:
            k = int(torch.nonzero((indices < 0) | (indices >= num_rows))[0])
            fail(f"indices[{k}]={int(indices[k])} is out of range [0, {num_rows})")
    if per_sample_weights is not None:
        if per_sample_weights.shape != indices.shape:
            fail(f"per_sample_weights must have shape {tuple(indices.shape)}, got {tuple(per_sample_weights.shape)}")
        if per_sample_weights.dtype != cores[0].dtype:
            fail(f"per_sample_weights must be {cores[0].dtype}, got {per_sample_weights.dtype}")
    if pooling_mode not in (POOLING_SUM, POOLING_MEAN):
        fail(f"pooling_mode must be 0 (sum) or 1 (mean), got {pooling_mode}")
    if variant not in (VARIANT_TT, VARIANT_GRT):
        fail(f"variant must be 0 (tt) or 1 (grt), got {variant}")


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
    if num_lookups == 0:
        # Keep the graph connected so backward yields zero gradients, not None.
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
