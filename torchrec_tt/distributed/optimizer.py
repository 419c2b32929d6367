"""Optimizers of sharded TT cores, exposed the way TorchRec exposes fused optimizers.

The cores of a sharded table are updated in backward, as TorchRec's fused (FBGEMM)
kernels update their rows: every core gets its own ``torch.optim`` optimizer, stepped by
a post-accumulate-grad hook, and carries ``_in_backward_optimizers`` so that
``torchrec.optim.optimizers.in_backward_optimizer_filter`` keeps it out of the dense
optimizer. :class:`TTFusedOptimizer` presents those optimizers as one
``KeyedOptimizer`` keyed by the unsharded parameter names, which
``DistributedModelParallel.fused_optimizer`` picks up.

The optimizer is configured like TorchRec's: the sharder's ``fused_params``
(``optimizer``: an ``EmbOptimType`` such as ``EXACT_ADAGRAD``, plus ``learning_rate``,
``eps``, ``beta1``, ``beta2``, ``weight_decay``), or
``apply_optimizer_in_backward(optimizer_class, tt_ebc.parameters(), kwargs)`` on the
unsharded module, whose class and kwargs are used verbatim.
"""

import copy
from enum import Enum
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import torch
from torch import nn
import torchrec.optim as trec_optim
from torchrec.optim.fused import FusedOptimizer

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
        kwargs = {k: v for k, v in fused_params["optimizer_kwargs"]}
    else:
        kwargs = {"lr": fused_params.get("learning_rate", _DEFAULT_LEARNING_RATE)}
        kwargs.update({k: fused_params[k] for k in _FUSED_KWARGS.get(optimizer_class, ()) if k in fused_params})
        if optimizer_class is torch.optim.Adam and ("beta1" in fused_params or "beta2" in fused_params):
            kwargs["betas"] = (fused_params.get("beta1", 0.9), fused_params.get("beta2", 0.999))
    return optimizer_class, kwargs


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


class TTFusedOptimizer(FusedOptimizer):
    """In-backward optimizers of TT cores as one ``KeyedOptimizer``.

    Each core gets ``optimizer_class([core], **optimizer_kwargs)``, stepped by a hook as
    soon as the core's gradient is accumulated; the gradient is then dropped. ``step()``
    only steps cores that still hold a gradient (e.g. after ``init_state()``), so a
    training loop that calls ``optimizer.step()`` after ``backward()`` stays correct.

    ``state_dict()`` is keyed by the given parameter names. ``load_state_dict()`` also
    accepts a state saved before the first step or loaded into a fresh optimizer (the
    generic ``KeyedOptimizer.load_state_dict`` reached through a ``CombinedOptimizer``
    needs ``init_state()`` first, as for any lazily initialized torch optimizer).

    Args:
        params (Mapping[str, nn.Parameter]): the cores, by parameter name.
        optimizer_class (Type[torch.optim.Optimizer]): e.g. ``torch.optim.Adagrad``.
        optimizer_kwargs (Dict[str, Any]): constructor kwargs, e.g. ``{"lr": 0.1}``.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        optimizer_class: Type[torch.optim.Optimizer],
        optimizer_kwargs: Dict[str, Any],
    ) -> None:
        self._optimizers: Dict[str, torch.optim.Optimizer] = {}
        for key, param in params.items():
            try:
                optimizer = optimizer_class([param], **optimizer_kwargs)
            except TypeError as e:
                raise ValueError(f"parameter '{key}': cannot build {optimizer_class.__name__}(**{optimizer_kwargs}): {e}") from e
            self._optimizers[key] = optimizer
            param._in_backward_optimizers = [optimizer]  # pyre-ignore[16]
            param._optimizer_classes = [optimizer_class]  # pyre-ignore[16]
            param._optimizer_kwargs = [dict(optimizer_kwargs)]  # pyre-ignore[16]
            param.register_post_accumulate_grad_hook(_step_and_release(optimizer))
        super().__init__(dict(params), self._collect_state(params), self._collect_param_groups())

    def _collect_state(self, params: Mapping[str, nn.Parameter]) -> Dict[nn.Parameter, Dict[str, Any]]:
        # torch optimizers fill ``state[p]`` in place on their first step, so sharing the
        # per-parameter dicts keeps this view current (until a torch load_state_dict
        # replaces them: see load_state_dict).
        return {param: self._optimizers[key].state[param] for key, param in params.items()}

    def _collect_param_groups(self) -> list:
        return [group for optimizer in self._optimizers.values() for group in optimizer.param_groups]

    def step(self, closure: Any = None) -> None:
        for key, param in self.params.items():
            if param.grad is not None:
                self._optimizers[key].step()
                param.grad = None

    def zero_grad(self, set_to_none: bool = False) -> None:
        for param in self.params.values():
            param.grad = None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        new_state = state_dict["state"]
        missing = [key for key in self.params if key not in new_state]
        if missing:
            raise ValueError(f"optimizer state is missing parameters {missing}")
        for key, optimizer in self._optimizers.items():
            # torch's load_state_dict keeps same-device tensors by reference: copy them so
            # this optimizer never shares state with the checkpoint or another model.
            state = {name: _copy_value(value) for name, value in new_state[key].items()}
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": {0: state} if state else {}, "param_groups": groups})
        self.state = self._collect_state(self.params)
        self.param_groups = self._collect_param_groups()
        self.post_load_state_dict()


def _copy_value(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _step_and_release(optimizer: torch.optim.Optimizer):
    def hook(param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None

    return hook
