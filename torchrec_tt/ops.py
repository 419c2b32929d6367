"""Front-end of the ``torchrec_tt`` ops: dispatch, fake kernels and autograd.

``torch.ops.torchrec_tt.*`` come from the C++/CUDA extension (``csrc/``). When it is
not built, or has no kernel for the tensors' device, the same algorithm runs in pure
PyTorch (:mod:`torchrec_tt._python_ops`); the package says so once, at import.
"""

import importlib
import math
import warnings
from typing import List, Optional, Sequence, Union

import torch
from torchrec.modules.embedding_configs import PoolingType

from torchrec_tt import _python_ops
from torchrec_tt.grouping import GroupPlan, group_plan_python, plan_numel, unpack_plan

try:
    importlib.import_module("torchrec_tt._C")  # registers torch.ops.torchrec_tt.*

    HAS_EXTENSION = True
except ImportError as _err:  # pragma: no cover - depends on the build
    HAS_EXTENSION = False
    warnings.warn(
        f"torchrec_tt: C++ extension not available ({_err}); using the pure-PyTorch ops",
        stacklevel=2,
    )

_POOLING_MODES = {"sum": _python_ops.POOLING_SUM, "mean": _python_ops.POOLING_MEAN}
_VARIANTS = {"tt": _python_ops.VARIANT_TT, "grt": _python_ops.VARIANT_GRT}
_INDEX_DTYPES = {torch.int32, torch.int64}


def uses_extension(device: torch.device) -> bool:
    """Whether ops on ``device`` run the compiled kernels (else the PyTorch path)."""
    if not HAS_EXTENSION:
        return False
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "torchrec_tt::tt_embedding_bag", key
    )


def _pooling_mode(pooling: Union[str, PoolingType]) -> int:
    name = pooling.value.lower() if isinstance(pooling, PoolingType) else str(pooling).lower()
    if name not in _POOLING_MODES:
        raise ValueError(f"pooling must be one of {list(_POOLING_MODES)}, got {pooling!r}")
    return _POOLING_MODES[name]


def _variant(variant: str) -> int:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {list(_VARIANTS)}, got {variant!r}")
    return _VARIANTS[variant]


def tt_embedding_bag(
    cores: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    pooling: Union[str, PoolingType] = "sum",
    variant: str = "grt",
) -> torch.Tensor:
    """Pooled lookups in a TT-compressed table (differentiable).

    Args:
        cores (Sequence[Tensor]): ``d`` cores, core ``k`` of shape ``(m_k, R[k], n_k, R[k+1])``.
        indices (Tensor): ``(L,)`` int32/int64 row ids.
        offsets (Tensor): ``(B + 1,)`` bag boundaries (``offsets[-1] == L``).
        per_sample_weights (Optional[Tensor]): ``(L,)`` weights, cores' dtype.
        pooling (str | PoolingType): ``"sum"`` or ``"mean"``.
        variant (str): ``"grt"`` (group-reduced) or ``"tt"`` (one chain per lookup).

    Returns:
        Tensor: ``(B, N)`` with ``N = prod(n_k)``; an empty bag gives zeros.
    """
    mode, var = _pooling_mode(pooling), _variant(variant)
    if offsets.dtype != indices.dtype and {indices.dtype, offsets.dtype} <= _INDEX_DTYPES:
        offsets = offsets.to(indices.dtype)  # never cast float offsets: the op rejects them
    cores = list(cores)
    if uses_extension(indices.device):
        # grt: the batch's plan is built once here; autograd saves it for the backward.
        plan = (
            torch.ops.torchrec_tt.group_plan(indices, offsets, cores[-1].shape[0], math.prod(c.shape[0] for c in cores))
            if var == _python_ops.VARIANT_GRT
            else None
        )
        return torch.ops.torchrec_tt.tt_embedding_bag(cores, indices, offsets, per_sample_weights, mode, var, plan)
    return _python_ops.tt_embedding_bag_python(cores, indices, offsets, per_sample_weights, mode, var)


def group_plan(indices: torch.Tensor, offsets: torch.Tensor, last_rows: int) -> GroupPlan:
    """Distinct (bag, group) segments and groups of a batch, trimmed to their counts.

    Row ``i`` belongs to group ``i // last_rows``. Reads the counts on the host, so it
    is meant for statistics and planning, not for the training hot path.
    """
    if offsets.dtype != indices.dtype and {indices.dtype, offsets.dtype} <= _INDEX_DTYPES:
        offsets = offsets.to(indices.dtype)
    if not uses_extension(indices.device):
        return group_plan_python(indices, offsets, last_rows)
    plan = torch.ops.torchrec_tt.group_plan(indices, offsets, last_rows)
    fields = unpack_plan(plan, indices.numel(), offsets.numel() - 1)
    num_segments, num_slots = fields["header"][:2].tolist()
    return GroupPlan(
        lookup_segment=fields["lookup_segment"],
        segment_bag=fields["segment_bag"][:num_segments],
        segment_group=fields["segment_group"][:num_segments],
        segment_slot=fields["segment_slot"][:num_segments],
        slot_group=fields["slot_group"][:num_slots],
    )


def _register_extension_ops() -> None:
    """Fake kernels and autograd for the compiled ops (registered once per process)."""

    @torch.library.register_fake("torchrec_tt::group_plan")
    def _group_plan_fake(indices, offsets, last_rows, num_rows=-1):
        torch._check(indices.dim() == 1, lambda: f"indices must be 1-D, got {indices.dim()}-D")
        torch._check(offsets.dim() == 1, lambda: f"offsets must be 1-D, got {offsets.dim()}-D")
        return indices.new_empty(plan_numel(indices.shape[0], offsets.shape[0] - 1), dtype=torch.int64)

    @torch.library.register_fake("torchrec_tt::tt_embedding_bag")
    def _forward_fake(cores, indices, offsets, per_sample_weights, pooling_mode, variant, plan=None):
        torch._check(offsets.dim() == 1, lambda: f"offsets must be 1-D, got {offsets.dim()}-D")
        dim = math.prod(c.shape[2] for c in cores)
        return cores[0].new_empty(offsets.shape[0] - 1, dim)

    @torch.library.register_fake("torchrec_tt::tt_embedding_bag_backward")
    def _backward_fake(
        grad_output, cores, indices, offsets, per_sample_weights, pooling_mode, variant, psw_grad, plan=None
    ):
        weights_grad = (
            per_sample_weights.new_empty(indices.shape[0]) if psw_grad else cores[0].new_empty(0)
        )
        return [torch.empty_like(c) for c in cores], weights_grad

    def _setup_context(ctx, inputs, output):
        cores, indices, offsets, per_sample_weights, pooling_mode, variant, plan = inputs
        # The dispatcher drops an argument equal to its default (plan=None) from the call, and the
        # backward must return one gradient per argument actually passed.
        ctx.num_inputs = 6 if plan is None else 7
        ctx.num_cores = len(cores)
        ctx.pooling_mode, ctx.variant = pooling_mode, variant
        ctx.psw_requires_grad = per_sample_weights is not None and per_sample_weights.requires_grad
        ctx.save_for_backward(*cores, indices, offsets, per_sample_weights, plan)

    def _backward(ctx, grad_output):
        *cores, indices, offsets, per_sample_weights, plan = ctx.saved_tensors
        core_grads, psw_grad = torch.ops.torchrec_tt.tt_embedding_bag_backward(
            grad_output.contiguous(),
            cores,
            indices,
            offsets,
            per_sample_weights,
            ctx.pooling_mode,
            ctx.variant,
            ctx.psw_requires_grad,
            plan,
        )
        grads = (list(core_grads), None, None, psw_grad if ctx.psw_requires_grad else None, None, None, None)
        return grads[: ctx.num_inputs]

    torch.library.register_autograd(
        "torchrec_tt::tt_embedding_bag", _backward, setup_context=_setup_context
    )


if HAS_EXTENSION:
    _register_extension_ops()
