"""Optimizers of sharded TT cores, exposed the way TorchRec exposes fused optimizers.

The cores of a sharded table are updated in backward, as TorchRec's fused (FBGEMM)
kernels update their rows: every core gets its own ``torch.optim`` optimizer and carries
``_in_backward_optimizers`` so that ``torchrec.optim.optimizers.in_backward_optimizer_filter``
keeps it out of the dense optimizer. :class:`TTFusedOptimizer` presents those optimizers
as one ``KeyedOptimizer`` keyed by the unsharded parameter names, which
``DistributedModelParallel.fused_optimizer`` picks up.

**Atomic steps** (docs/design.md, section 5). A core's post-accumulate-grad hook does not
step: it moves the gradient into a per-backward stash. One autograd-engine callback
(``Variable._execution_engine.queue_callback``), which the engine runs only when the
whole backward has succeeded, then steps every stashed core of every TT optimizer of the
process. A backward that raises anywhere (the loss, a hook, another module, a
collective) runs no callback, so every table and its optimizer state are left exactly as
they were; the stash of a failed backward is dropped when the next backward starts. One
backward at a time per process (no nested, reentrant backward through TT lookups).

**Data-parallel tables** (docs/design.md, section 9). Their optimizers carry a process
group (``grad_sync_group``). Before anything is stepped, :meth:`_DeferredSteps._apply`
averages the stashed gradients of those cores over their group: one flat bucket per
(group, dtype, device), one all-reduce each (``host_all_reduce_``: shared memory between
ranks of one host, else the group's backend), in the order the optimizers were built
(identical on every rank), so every rank steps the same gradient and optimizer states
stay identical. Every rank's backward must reach the same data-parallel tables (it does
when their output feeds every rank's loss: an empty batch still yields zero gradients).

The optimizer is configured like TorchRec's: the sharder's ``fused_params``
(``optimizer``: an ``EmbOptimType`` such as ``EXACT_ADAGRAD``, plus ``learning_rate``,
``eps``, ``beta1``, ``beta2``, ``weight_decay``), or
``apply_optimizer_in_backward(optimizer_class, tt_ebc.parameters(), kwargs)`` on the
unsharded module, whose class and kwargs are used verbatim.
"""

import copy
import itertools
import re
import threading
from collections import defaultdict
from enum import Enum
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
import torchrec.optim as trec_optim
from torchrec.optim.fused import FusedOptimizer

from torchrec_tt.distributed.shm_all_reduce import host_all_reduce_

OptimizerSpec = Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]

_DEFAULT_LEARNING_RATE = 0.01  # FBGEMM's default

# EmbOptimType values (strings, so any FBGEMM version works) -> torch optimizer.
_EMB_OPT_TYPE_TO_TORCH: Dict[str, Type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "exact_sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "exact_adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
}
# fused_params keys (FBGEMM's names) each optimizer takes, besides learning_rate -> lr and
# beta1/beta2 -> betas (Adam).
_FUSED_KWARGS: Dict[Type[torch.optim.Optimizer], Tuple[str, ...]] = {
    torch.optim.SGD: ("weight_decay",),
    torch.optim.Adagrad: ("eps", "weight_decay"),
    torch.optim.Adam: ("eps", "weight_decay"),
}
# torchrec.optim placeholders (they cannot step) -> the torch optimizer they stand for.
_TORCHREC_PLACEHOLDERS: Dict[type, Type[torch.optim.Optimizer]] = {
    trec_optim.SGD: torch.optim.SGD,
    trec_optim.Adagrad: torch.optim.Adagrad,
    trec_optim.Adam: torch.optim.Adam,
}


def _freeze(value: Any) -> Any:
    """Hashable copy of optimizer kwargs (TorchRec hashes ``fused_params`` to group tables)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def optimizer_fused_params(
    optimizer_class: Type[torch.optim.Optimizer], optimizer_kwargs: Mapping[str, Any]
) -> Dict[str, Any]:
    """``fused_params`` entries for a torch optimizer given by ``apply_optimizer_in_backward``."""
    return {"optimizer": optimizer_class, "optimizer_kwargs": _freeze(dict(optimizer_kwargs))}


def resolve_optimizer(fused_params: Mapping[str, Any], table: str = "") -> Optional[OptimizerSpec]:
    """The ``(torch optimizer class, kwargs)`` that ``fused_params`` asks for, or ``None``.

    Raises:
        ValueError: the optimizer is not one the TT kernel supports.
    """
    optimizer = fused_params.get("optimizer")
    if optimizer is None:
        return None
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        optimizer_class = _TORCHREC_PLACEHOLDERS.get(optimizer, optimizer)
    else:
        name = (optimizer.value if isinstance(optimizer, Enum) else str(optimizer)).lower()
        if name not in _EMB_OPT_TYPE_TO_TORCH:
            raise ValueError(
                f"table '{table}': optimizer {optimizer!r} is not supported for TT cores; "
                f"use one of {sorted(_EMB_OPT_TYPE_TO_TORCH)} or a torch.optim.Optimizer class"
            )
        optimizer_class = _EMB_OPT_TYPE_TO_TORCH[name]
    if "optimizer_kwargs" in fused_params:
        kwargs = _optimizer_kwargs(fused_params["optimizer_kwargs"], table)
    else:
        kwargs = {"lr": fused_params.get("learning_rate", _DEFAULT_LEARNING_RATE)}
        kwargs.update({k: fused_params[k] for k in _FUSED_KWARGS.get(optimizer_class, ()) if k in fused_params})
        if optimizer_class is torch.optim.Adam and ("beta1" in fused_params or "beta2" in fused_params):
            kwargs["betas"] = (fused_params.get("beta1", 0.9), fused_params.get("beta2", 0.999))
    return optimizer_class, kwargs


def _optimizer_kwargs(value: Any, table: str) -> Dict[str, Any]:
    """``optimizer_kwargs`` as a dict: a mapping (``{"lr": 0.1}``) or the hashable pairs
    :func:`optimizer_fused_params` stores (``(("lr", 0.1),)``)."""
    if isinstance(value, Mapping):
        return dict(value)
    pairs = list(value) if isinstance(value, (tuple, list)) else None
    if pairs is None or any(not isinstance(p, (tuple, list)) or len(p) != 2 or not isinstance(p[0], str) for p in pairs):
        raise ValueError(
            f"table '{table}': optimizer_kwargs must be a dict or (name, value) pairs, got {value!r}"
        )
    return dict(pairs)


def optimizer_state_multiplier(
    optimizer_class: Optional[Type[torch.optim.Optimizer]], optimizer_kwargs: Optional[Mapping[str, Any]] = None
) -> float:
    """Optimizer state per parameter element (0 for plain SGD, 1 for Adagrad, 2 for Adam).

    Counts the state tensors that have the parameter's shape; the per-tensor ``step``
    scalars are ignored.
    """
    if optimizer_class is None:
        return 0.0
    optimizer_class = _TORCHREC_PLACEHOLDERS.get(optimizer_class, optimizer_class)
    kwargs = optimizer_kwargs or {}
    if issubclass(optimizer_class, torch.optim.SGD):
        return 1.0 if kwargs.get("momentum", 0.0) else 0.0
    if issubclass(optimizer_class, (torch.optim.Adam, torch.optim.AdamW)):
        return 3.0 if kwargs.get("amsgrad", False) else 2.0
    return 1.0


_CORE_KEY = re.compile(r"(?:^|\.)embedding_bags\.([^.]+)\.(?:cores\.\d+|cache_weight)$")


def _table_of(key: str) -> str:
    """Table name in a core's or cache's parameter name (``...embedding_bags.<table>.cores.<k>``)."""
    match = _CORE_KEY.search(key)
    return match.group(1) if match else key


def check_state_shapes(key: str, param: torch.Tensor, state: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if a state tensor of core ``key`` has neither the core's shape
    nor a scalar's (``step``): naming the table, the parameter, the state key, expected and
    actual shape."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"table '{_table_of(key)}', parameter '{key}': optimizer state '{name}' has shape "
                f"{tuple(value.shape)}, expected {tuple(param.shape)}"
            )


class _DeferredSteps:
    """Gradients stashed by the cores' hooks during one backward, stepped at its end.

    The first hook of a backward (autograd graph task) queues :meth:`_finish` on the
    engine; the engine runs queued callbacks only after every node of the backward ran
    without error. :meth:`_finish` queues :meth:`_apply` once more, so the steps come
    after the callbacks other modules queued during the backward (e.g. DDP's gradient
    all-reduce): if one of those raises, nothing is stepped either.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._task: int = -1
        self._pending: Dict[int, Tuple["TTFusedOptimizer", str, torch.Tensor, torch.Tensor]] = {}

    def stash(self, optimizer: "TTFusedOptimizer", key: str, param: torch.Tensor) -> None:
        grad, param.grad = param.grad, None
        if grad is None:
            return
        task = torch._C._current_graph_task_id()
        if task < 0:  # not inside a backward (cannot happen for accumulate-grad hooks): step now
            optimizer._step_one(key, param, grad)
            return
        with self._lock:
            if task != self._task:
                # A backward that left a stash behind failed: drop its gradients.
                self._pending.clear()
                self._task = task
                Variable._execution_engine.queue_callback(self._finish)
            previous = self._pending.get(id(param))
            if previous is not None:
                grad = previous[3] + grad
            self._pending[id(param)] = (optimizer, key, param, grad)

    def _finish(self) -> None:
        Variable._execution_engine.queue_callback(self._apply)

    def _apply(self) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
            self._task = -1
        pending = _average_data_parallel_grads(pending)
        # Check everything first: a step either happens for every core or for none.
        for optimizer, key, param, grad in pending:
            check_state_shapes(key, param, optimizer._optimizers[key].state.get(optimizer._shadows.get(key, param), {}))
        _step_pending(pending)

    def discard(self, optimizer: "TTFusedOptimizer") -> None:
        with self._lock:
            for ident in [i for i, entry in self._pending.items() if entry[0] is optimizer]:
                del self._pending[ident]


_DEFERRED = _DeferredSteps()
_OPTIMIZER_SEQUENCE = itertools.count()  # build order: the same on every rank

_Pending = Tuple["TTFusedOptimizer", str, torch.Tensor, torch.Tensor]


def _average_data_parallel_grads(pending: List[_Pending]) -> List[_Pending]:
    """Stashed gradients with those of data-parallel optimizers averaged over their group.

    One bucket (flat tensor) and one ``all_reduce`` per (process group, dtype, device),
    entries in build order and parameter-name order, so every rank packs the same layout.
    """
    buckets: Dict[Tuple[int, torch.dtype, torch.device], List[int]] = {}
    for i, (optimizer, _, _, grad) in enumerate(pending):
        if optimizer.grad_sync_group is not None:
            buckets.setdefault((id(optimizer.grad_sync_group), grad.dtype, grad.device), []).append(i)
    if not buckets:
        return pending
    pending = list(pending)
    for positions in buckets.values():
        positions.sort(key=lambda i: (pending[i][0]._sequence, pending[i][1]))
        group = pending[positions[0]][0].grad_sync_group
        flat = torch.cat([pending[i][3].reshape(-1) for i in positions])
        host_all_reduce_(flat, group)
        flat.div_(dist.get_world_size(group))
        for i, part in zip(positions, flat.split([pending[i][3].numel() for i in positions])):
            optimizer, key, param, grad = pending[i]
            pending[i] = (optimizer, key, param, part.view_as(grad))
    return pending


# (optimizer class, hyperparameters) -> a torch optimizer that steps several cores at once.
_STEPPERS: Dict[Tuple[type, Tuple[Tuple[str, Any], ...]], torch.optim.Optimizer] = {}


def _hyperparameters(optimizer: torch.optim.Optimizer) -> Optional[Tuple[Tuple[str, Any], ...]]:
    """The single param group's settings as a hashable key, or ``None`` (unhashable values, or
    step hooks on this optimizer, which a combined step would bypass)."""
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return None
    settings = tuple(sorted((k, v) for k, v in optimizer.param_groups[0].items() if k != "params"))
    try:
        hash(settings)
    except TypeError:
        return None
    return settings


def _step_pending(pending: List[_Pending]) -> None:
    """Steps the stashed cores. Cores whose torch optimizers share class and settings step as
    one optimizer: one ``step()`` call instead of one per core, whose fixed cost is most of a
    small core's step. The optimizer runs the same ops on each tensor, so the result is the
    same bits, and the state stays in each core's own optimizer (the combined one only borrows
    it). fp16/bf16 cores (fp32 stand-ins) and optimizers with step hooks step one by one."""
    together: Dict[Tuple[type, Tuple[Tuple[str, Any], ...]], List[_Pending]] = {}
    for entry in pending:
        optimizer, key, param, grad = entry
        own = optimizer._optimizers[key]
        settings = None if key in optimizer._shadows else _hyperparameters(own)
        if settings is None:
            optimizer._step_one(key, param, grad)
        else:
            together.setdefault((type(own), settings), []).append(entry)
    for batch_key, entries in together.items():
        if len(entries) == 1:
            optimizer, key, param, grad = entries[0]
            optimizer._step_one(key, param, grad)
            continue
        owners = [optimizer._optimizers[key] for optimizer, key, _, _ in entries]
        stepper = _STEPPERS.get(batch_key)
        if stepper is None:
            stepper = _STEPPERS[batch_key] = copy.copy(owners[0])  # fresh hooks, shares nothing mutable below
        params = [param for _, _, param, _ in entries]
        stepper.param_groups = [{**owners[0].param_groups[0], "params": params}]
        stepper.state = defaultdict(dict, {param: own.state[param] for param, own in zip(params, owners)})
        for _, _, param, grad in entries:
            param.grad = grad
        try:
            stepper.step()
        finally:
            for param in params:
                param.grad = None
            stepper.param_groups, stepper.state = [], defaultdict(dict)  # hold no core between steps


class TTFusedOptimizer(FusedOptimizer):
    """In-backward optimizers of TT cores as one ``KeyedOptimizer``.

    Each core gets ``optimizer_class([core], **optimizer_kwargs)``. Its gradient is taken
    from the core as soon as it is accumulated and the core is stepped when the whole
    backward has succeeded (atomic: a backward that raises steps no core and leaves
    every optimizer state as it was; see the module docstring). ``step()`` only steps
    cores that still hold a gradient (e.g. after ``init_state()``), so a training loop
    that calls ``optimizer.step()`` after ``backward()`` stays correct.

    ``state_dict()`` is keyed by the given parameter names. ``load_state_dict()`` also
    accepts a state saved before the first step or loaded into a fresh optimizer (the
    generic ``KeyedOptimizer.load_state_dict`` reached through a ``CombinedOptimizer``
    needs ``init_state()`` first, as for any lazily initialized torch optimizer), and
    rejects state tensors whose shape is not the core's with ``ValueError``.

    Args:
        params (Mapping[str, nn.Parameter]): the cores, by parameter name.
        optimizer_class (Type[torch.optim.Optimizer]): e.g. ``torch.optim.Adagrad``.
        optimizer_kwargs (Dict[str, Any]): constructor kwargs, e.g. ``{"lr": 0.1}``.
        kwargs_overrides (Optional[Mapping[str, Dict[str, Any]]]): per parameter name, kwargs
            that replace some of ``optimizer_kwargs`` (e.g. a hot-row cache's own ``lr``).
        grad_sync_group (Optional[dist.ProcessGroup]): data-parallel parameters: their
            gradients are averaged over this group (one bucketed all-reduce per
            backward) before they are stepped.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        optimizer_class: Type[torch.optim.Optimizer],
        optimizer_kwargs: Dict[str, Any],
        kwargs_overrides: Optional[Mapping[str, Dict[str, Any]]] = None,
        grad_sync_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.grad_sync_group = grad_sync_group
        self._sequence = next(_OPTIMIZER_SEQUENCE)
        self._optimizers: Dict[str, torch.optim.Optimizer] = {}
        overrides = kwargs_overrides or {}
        # fp16/bf16 cores: the torch optimizer steps an fp32 stand-in (filled from the core for
        # the step, emptied after), so its state (Adagrad's sum, Adam's moments) is fp32 and the
        # update is computed in fp32; the result is written back rounded stochastically (bf16)
        # or to nearest (fp16), so small updates are not all lost to rounding.
        self._shadows: Dict[str, nn.Parameter] = {
            key: nn.Parameter(param.detach().float())  # full shape while the optimizer is built
            for key, param in params.items()
            if param.dtype in (torch.float16, torch.bfloat16)
        }
        for key, param in params.items():
            kwargs = {**optimizer_kwargs, **overrides.get(key, {})}
            try:
                optimizer = optimizer_class([self._shadows.get(key, param)], **kwargs)
            except TypeError as e:
                raise ValueError(f"parameter '{key}': cannot build {optimizer_class.__name__}(**{kwargs}): {e}") from e
            self._optimizers[key] = optimizer
            if key in self._shadows:
                self._shadows[key].data = torch.empty(0, dtype=torch.float32, device=param.device)
                optimizer.param_groups[0]["params"] = [param]  # the stand-in only inside a step
            param._in_backward_optimizers = [optimizer]  # pyre-ignore[16]
            param._optimizer_classes = [optimizer_class]  # pyre-ignore[16]
            param._optimizer_kwargs = [dict(kwargs)]  # pyre-ignore[16]
            param.register_post_accumulate_grad_hook(self._stash_hook(key))
        super().__init__(dict(params), self._collect_state(params), self._collect_param_groups())

    def _stash_hook(self, key: str):
        def hook(param: torch.Tensor) -> None:
            _DEFERRED.stash(self, key, param)

        return hook

    def _step_one(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        shadow = self._shadows.get(key)
        if shadow is not None:
            group = self._optimizers[key].param_groups[0]
            shadow.data = param.detach().float()
            shadow.grad = grad.float()
            group["params"] = [shadow]
            try:
                self._optimizers[key].step()
                with torch.no_grad():
                    param.copy_(_round_to(shadow.data, param.dtype))
            finally:
                group["params"] = [param]
                shadow.grad = None
                shadow.data = torch.empty(0, dtype=torch.float32, device=param.device)
            return
        param.grad = grad
        try:
            self._optimizers[key].step()
        finally:
            param.grad = None

    def _collect_state(self, params: Mapping[str, nn.Parameter]) -> Dict[nn.Parameter, Dict[str, Any]]:
        # torch optimizers fill ``state[p]`` in place on their first step, so sharing the
        # per-parameter dicts keeps this view current (until a torch load_state_dict
        # replaces them: see load_state_dict).
        return {param: self._optimizers[key].state[self._shadows.get(key, param)] for key, param in params.items()}

    def _collect_param_groups(self) -> list:
        return [group for optimizer in self._optimizers.values() for group in optimizer.param_groups]

    def step(self, closure: Any = None) -> None:
        for key, param in self.params.items():
            if param.grad is not None:
                self._step_one(key, param, param.grad)

    def zero_grad(self, set_to_none: bool = False) -> None:
        _DEFERRED.discard(self)
        for param in self.params.values():
            param.grad = None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        new_state = state_dict["state"]
        missing = [key for key in self.params if key not in new_state]
        if missing:
            raise ValueError(f"optimizer state is missing parameters {missing}")
        for key, param in self.params.items():  # check all before loading any
            check_state_shapes(key, param, new_state[key])
        for key, optimizer in self._optimizers.items():
            # torch's load_state_dict keeps same-device tensors by reference: copy them so
            # this optimizer never shares state with the checkpoint or another model.
            state = {name: _copy_value(value) for name, value in new_state[key].items()}
            shadow = self._shadows.get(key)
            if shadow is not None:  # load into the fp32 stand-in (torch casts state to its dtype)
                optimizer.param_groups[0]["params"] = [shadow]
            try:
                groups = optimizer.state_dict()["param_groups"]
                optimizer.load_state_dict({"state": {0: state} if state else {}, "param_groups": groups})
            finally:
                if shadow is not None:
                    optimizer.param_groups[0]["params"] = [self.params[key]]
        self.state = self._collect_state(self.params)
        self.param_groups = self._collect_param_groups()
        self.post_load_state_dict()


def _round_to(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> ``dtype``: bf16 by stochastic rounding (unbiased: E[result] = value), else nearest."""
    if dtype != torch.bfloat16:
        return value.to(dtype)
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _copy_value(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
