"""Checkpoint helpers for models holding sharded TT tables (any world size).

``model.state_dict()`` already holds every TT core under its unsharded key on every rank
(see :class:`~torchrec_tt.distributed.sharded_module.ShardedTTEmbeddingBagCollection`).
The cores' optimizer state is per rank in ``DistributedModelParallel.fused_optimizer``
(enough to resume at the same world size); these helpers gather it into, and load it
from, one world-size-independent dict keyed like ``model.named_parameters()``.
"""

from typing import Any, Dict, Iterator, Mapping, Tuple

from torch import nn
from torchrec.distributed.model_parallel import get_unwrapped_module

from torchrec_tt.distributed.sharded_module import ShardedTTEmbeddingBagCollection


def _sharded_tt_modules(model: nn.Module) -> Iterator[Tuple[str, ShardedTTEmbeddingBagCollection]]:
    root = get_unwrapped_module(model)
    stack = [("", root)]
    while stack:
        path, module = stack.pop()
        if isinstance(module, ShardedTTEmbeddingBagCollection):
            yield path, module
            continue
        for name, child in module.named_children():
            stack.append((f"{path}.{name}" if path else name, get_unwrapped_module(child)))


def tt_optimizer_state_dict(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Optimizer state of every sharded TT core in ``model``, identical on every rank.

    A collective: call it on all ranks. Keys are parameter names as in
    ``model.named_parameters()`` (e.g. ``"sparse.tt.embedding_bags.t0.cores.1"``),
    values the per-core optimizer state (host tensors), so it can be saved once and
    loaded at any world size with :func:`load_tt_optimizer_state_dict`, or into the
    unsharded model's ``KeyedOptimizer`` as ``{"state": ...}``.
    """
    state: Dict[str, Dict[str, Any]] = {}
    for path, module in _sharded_tt_modules(model):
        prefix = f"{path}." if path else ""
        state.update({prefix + k: v for k, v in module.optimizer_state_dict().items()})
    return state


def load_tt_optimizer_state_dict(model: nn.Module, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Load :func:`tt_optimizer_state_dict` output into the TT optimizers this rank holds."""
    for path, module in _sharded_tt_modules(model):
        prefix = f"{path}." if path else ""
        module.load_optimizer_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
