"""Front-end of the ``torchrec_tt`` ops: dispatch, fake kernels and autograd.

``torch.ops.torchrec_tt.*`` come from the C++/CUDA extension (``csrc/``). When it is
not built, or has no kernel for the tensors' device, the same algorithm runs in pure
PyTorch (:mod:`torchrec_tt._python_ops`); the package says so once, at import.
"""

import importlib
import math
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from torchrec_tt import _python_ops
from torchrec_tt.enums import PoolingLike, PoolingMode, Variant, VariantLike
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

_INDEX_DTYPES = {torch.int32, torch.int64}


def _extension_device_types() -> frozenset:
    """Device types with a compiled kernel, resolved once at import (a plain Python set, so
    the dispatch choice costs no dispatcher query, and no graph break when traced)."""
    if not HAS_EXTENSION:
        return frozenset()
    return frozenset(
        device_type
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("torchrec_tt::tt_embedding_bag", key)
    )


_EXTENSION_DEVICE_TYPES = _extension_device_types()


def uses_extension(device: torch.device) -> bool:
    """Whether ops on ``device`` run the compiled kernels (else the PyTorch path)."""
    return device.type in _EXTENSION_DEVICE_TYPES


def _pooling_mode(pooling: PoolingLike) -> int:
    """The op's ``int pooling_mode``: a plain int (the dispatcher and tracing see no enum)."""
    return int(PoolingMode.parse(pooling, "tt_embedding_bag"))


def _variant(variant: VariantLike) -> int:
    """The op's ``int variant``."""
    return int(Variant.parse(variant, "tt_embedding_bag"))


def _check_values_outside_kernels(per_sample_weights: Optional[torch.Tensor]) -> None:
    """Value checks the compiled kernels do not do: finite per-sample weights.

    On CPU always; on CUDA only with ``TORCHREC_TT_CHECK_BOUNDS=1`` (reading device values
    syncs). The pure-PyTorch path does these checks itself.
    """
    if per_sample_weights is None or _python_ops.is_tracing(per_sample_weights):
        return
    if per_sample_weights.device.type == "cpu" or os.environ.get("TORCHREC_TT_CHECK_BOUNDS", "0") == "1":
        _python_ops.check_per_sample_weights_finite("tt_embedding_bag", per_sample_weights)


def _batch_plan(
    cores: List[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    mode: int,
    var: int,
    cache: Tuple[Optional[torch.Tensor], ...] = (),
) -> torch.Tensor:
    """The packed plan of a grt batch (built once; autograd saves it for the backward).
    ``cache``: ``(cache_weight, cache_ids)`` or empty."""
    last_rows, num_rows = cores[-1].shape[0], math.prod([c.shape[0] for c in cores])
    cache_ids = cache[1] if cache else None
    if _python_ops.is_tracing(indices, offsets):
        # Traced (compile/export): the op's own checks run when the graph runs.
        return torch.ops.torchrec_tt.group_plan(indices, offsets, last_rows, num_rows, cache_ids)
    try:
        return torch.ops.torchrec_tt.group_plan(indices, offsets, last_rows, num_rows, cache_ids)
    except (ValueError, IndexError, TypeError, RuntimeError):
        # Report bad input as the forward op does, arguments checked in its order.
        torch.ops.torchrec_tt.tt_embedding_bag(cores, indices, offsets, per_sample_weights, mode, var, None, *cache)
        raise


def _records_backward(
    cores: List[torch.Tensor], per_sample_weights: Optional[torch.Tensor], cache_weight: Optional[torch.Tensor]
) -> bool:
    """Whether autograd records this call (a backward may follow and read its plan)."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*cores, per_sample_weights, cache_weight)
    )


def fuses_cache(device: torch.device) -> bool:
    """Whether the compiled kernels on ``device`` serve hot-row cache hits themselves (CPU);
    elsewhere :func:`torchrec_tt.cache.cached_tt_embedding_bag` splits them off."""
    return device.type == "cpu" and uses_extension(device)


def tt_embedding_bag(
    cores: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    pooling: PoolingLike = "sum",
    variant: VariantLike = "grt",
    cache_weight: Optional[torch.Tensor] = None,
    cache_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pooled lookups in a TT-compressed table (differentiable).

    Args:
        cores (Sequence[Tensor]): ``d`` cores, core ``k`` of shape ``(m_k, R[k], n_k, R[k+1])``.
        indices (Tensor): ``(L,)`` int32/int64 row ids.
        offsets (Tensor): ``(B + 1,)`` bag boundaries (``offsets[-1] == L``).
        per_sample_weights (Optional[Tensor]): ``(L,)`` finite weights, cores' dtype.
        pooling (PoolingMode | PoolingType | str): ``SUM``/``"sum"`` or ``MEAN``/``"mean"``.
        variant (Variant | str): ``GRT``/``"grt"`` (group-reduced) or ``TT``/``"tt"`` (one
            chain per lookup).
        cache_weight (Optional[Tensor]): ``(K, N)`` hot-row cache (cores' dtype), with
        cache_ids (Optional[Tensor]): ``(K,)`` its rows' ids, int64, distinct and ascending: a
            lookup of a cached row reads ``cache_weight`` instead of the cores
            (docs/design.md, section 10).

    Raises:
        ValueError: a bad argument, named with the expected and the actual value. On
            ``meta`` tensors only shapes, dtypes and devices are checked.

    Returns:
        Tensor: ``(B, N)`` with ``N = prod(n_k)``; an empty bag gives zeros.

    With autograd recording, ``grt`` groups the batch once (its plan) and the backward reuses
    it; without (``torch.no_grad()``, inference) no plan is built and the CPU kernels take a
    cheaper grouping (docs/design.md, section 3.4).
    """
    mode, var = _pooling_mode(pooling), _variant(variant)
    if offsets.dtype != indices.dtype and {indices.dtype, offsets.dtype} <= _INDEX_DTYPES:
        offsets = offsets.to(indices.dtype)  # never cast float offsets: the op rejects them
    cores = list(cores)
    if (cache_weight is None) != (cache_ids is None):
        raise ValueError("tt_embedding_bag: cache_weight and cache_ids go together, got "
                         f"{'cache_weight' if cache_ids is None else 'cache_ids'} alone")
    if cache_weight is not None and not fuses_cache(indices.device):
        from torchrec_tt.cache import cached_tt_embedding_bag  # imports this module

        return cached_tt_embedding_bag(cores, cache_weight, cache_ids, indices, offsets, per_sample_weights,
                                       PoolingMode(mode), Variant(var))
    if uses_extension(indices.device):
        _check_values_outside_kernels(per_sample_weights)
        cache = () if cache_weight is None else (cache_weight, cache_ids)
        # grt: the batch's plan is built once here when autograd will save it for the backward;
        # without one (inference) the CPU kernel runs over the batch's distinct rows instead.
        needs_plan = var == Variant.GRT and _records_backward(cores, per_sample_weights, cache_weight)
        plan = _batch_plan(cores, indices, offsets, per_sample_weights, mode, var, cache) if needs_plan else None
        return torch.ops.torchrec_tt.tt_embedding_bag(cores, indices, offsets, per_sample_weights, mode, var, plan, *cache)
    return _python_ops.tt_embedding_bag_python(cores, indices, offsets, per_sample_weights, mode, var)


def _check_group_plan_inputs(indices: torch.Tensor, offsets: torch.Tensor, last_rows: int) -> None:
    """The checks of the compiled ``group_plan`` for its pure-PyTorch twin."""
    for name, t in (("indices", indices), ("offsets", offsets)):
        if t.dim() != 1 or t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"group_plan: {name} must be a 1-D int32 or int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if offsets.numel() == 0:
        raise ValueError("group_plan: offsets must have B + 1 >= 1 entries, got 0")
    if last_rows < 1:
        raise ValueError(f"group_plan: last_rows must be >= 1, got {last_rows}")
    _python_ops.check_index_values("group_plan", indices, offsets, None)


def group_plan(indices: torch.Tensor, offsets: torch.Tensor, last_rows: int) -> GroupPlan:
    """Distinct (bag, group) segments and groups of a batch, trimmed to their counts.

    Row ``i`` belongs to group ``i // last_rows``. Reads the counts on the host, so it
    is meant for statistics and planning, not for the training hot path.
    """
    if offsets.dtype != indices.dtype and {indices.dtype, offsets.dtype} <= _INDEX_DTYPES:
        offsets = offsets.to(indices.dtype)
    if not uses_extension(indices.device):
        _check_group_plan_inputs(indices, offsets, last_rows)
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
    """Fake kernels for the compiled ops (registered once per process)."""

    @torch.library.register_fake("torchrec_tt::group_plan")
    def _group_plan_fake(indices, offsets, last_rows, num_rows=-1, cache_ids=None):
        torch._check(indices.dim() == 1, lambda: f"indices must be 1-D, got {indices.dim()}-D")
        torch._check(offsets.dim() == 1, lambda: f"offsets must be 1-D, got {offsets.dim()}-D")
        return indices.new_empty(plan_numel(indices.shape[0], offsets.shape[0] - 1), dtype=torch.int64)

    @torch.library.register_fake("torchrec_tt::tt_embedding_bag")
    def _forward_fake(cores, indices, offsets, per_sample_weights, pooling_mode, variant, plan=None,
                      cache_weight=None, cache_ids=None):
        torch._check(offsets.dim() == 1, lambda: f"offsets must be 1-D, got {offsets.dim()}-D")
        dim = math.prod(c.shape[2] for c in cores)
        return cores[0].new_empty(offsets.shape[0] - 1, dim)

    @torch.library.register_fake("torchrec_tt::tt_embedding_bag_backward")
    def _backward_fake(
        grad_output, cores, indices, offsets, per_sample_weights, pooling_mode, variant, psw_grad, plan=None,
        cache_weight=None, cache_ids=None,
    ):
        weights_grad = (
            per_sample_weights.new_empty(indices.shape[0]) if psw_grad else cores[0].new_empty(0)
        )
        cache_grad = torch.empty_like(cache_weight) if cache_weight is not None else cores[0].new_empty(0)
        return [torch.empty_like(c) for c in cores], weights_grad, cache_grad

    # Autograd is registered in C++ (csrc/tt_embedding_bag_autograd.cpp).


if HAS_EXTENSION:
    _register_extension_ops()
