"""The TT compute kernel that TorchRec's grouped lookup runs for ``customized_kernel`` tables."""

from typing import Any, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_kernel import BaseEmbedding
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig, ShardedEmbeddingTable
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.distributed.optimizer import TTFusedOptimizer, resolve_optimizer
from torchrec_tt.modules import TTEmbeddingBag

# fused_params keys that carry a table's TT layout (TTEmbeddingBagConfig.tt_fused_params).
TT_LAYOUT_KEYS = ("tt_p_shapes", "tt_q_shapes", "tt_ranks", "variant")


def tt_config_from_sharded_table(table: ShardedEmbeddingTable, fused_params: Mapping[str, Any]) -> TTEmbeddingBagConfig:
    """Rebuild a table's ``TTEmbeddingBagConfig`` from TorchRec's sharded table and fused params."""
    missing = [k for k in TT_LAYOUT_KEYS if k not in fused_params]
    if missing:
        raise ValueError(f"table '{table.name}': fused_params lack the TT layout keys {missing}")
    return TTEmbeddingBagConfig(
        name=table.name,
        num_embeddings=table.num_embeddings,
        embedding_dim=table.embedding_dim,
        feature_names=list(table.feature_names),
        pooling=table.pooling,
        data_type=table.data_type,
        weight_init_max=table.weight_init_max,
        weight_init_min=table.weight_init_min,
        tt_p_shapes=list(fused_params["tt_p_shapes"]),
        tt_q_shapes=list(fused_params["tt_q_shapes"]),
        tt_ranks=list(fused_params["tt_ranks"]),
        variant=fused_params["variant"],
        cache_rows=int(fused_params.get("cache_rows", 0)),
    )


class TTEmbeddingBagKernel(BaseEmbedding, FusedOptimizerModule):
    """TT-compressed tables of one TorchRec group (same TT layout, pooling and fused params).

    Holds one :class:`~torchrec_tt.modules.TTEmbeddingBag` per table in
    ``embedding_bags`` and computes a table's features in one op call, as the unsharded
    :class:`~torchrec_tt.modules.TTEmbeddingBagCollection` does, so both give the same
    values and gradients.

    Args:
        config (GroupedEmbeddingConfig): the group; its ``fused_params`` carry the TT
            layout (``tt_p_shapes``, ``tt_q_shapes``, ``tt_ranks``, ``variant``, ``cache_rows``) and
            optionally the optimizer (see :mod:`torchrec_tt.distributed.optimizer`) and
            ``cache_learning_rate``, the lr of cached rows (default: the cores').
        pg (Optional[dist.ProcessGroup]): the sharding process group; the gradients of
            data-parallel cores are averaged over it.
        device (Optional[torch.device]): where to allocate the cores.
        data_parallel (bool): the tables are replicated on every rank of ``pg``: core
            gradients are all-reduced (averaged) before the optimizer steps them.
    """

    def __init__(
        self,
        config: GroupedEmbeddingConfig,
        pg: Optional[dist.ProcessGroup] = None,
        device: Optional[torch.device] = None,
        data_parallel: bool = False,
    ) -> None:
        super().__init__()
        self._config = config
        fused_params = dict(config.fused_params or {})
        self._tables: List[TTEmbeddingBagConfig] = [
            tt_config_from_sharded_table(t, fused_params) for t in config.embedding_tables
        ]
        self.embedding_bags = nn.ModuleDict({t.name: TTEmbeddingBag(t, device) for t in self._tables})
        self._feature_splits = [len(t.feature_names) for t in self._tables]
        names = ",".join(t.name for t in self._tables)
        spec = resolve_optimizer(fused_params, names)
        if data_parallel and spec is None:
            raise ValueError(f"tables '{names}': data-parallel TT tables need a fused optimizer, got none")
        # The cached rows are uncompressed: "cache_learning_rate" gives them their own lr.
        cache_lr = fused_params.get("cache_learning_rate")
        overrides = {
            name: {"lr": cache_lr} for name, _ in self.named_parameters() if cache_lr is not None and name.endswith(".cache_weight")
        }
        # All the tables' parameters (cores, and the cached rows), not only cores.
        grad_pg = pg if data_parallel and pg is not None and dist.get_world_size(pg) > 1 else None
        self._optim: KeyedOptimizer = (
            TTFusedOptimizer(dict(self.named_parameters()), *spec, overrides, grad_sync_group=grad_pg)
            if spec is not None
            else EmptyFusedOptimizer()
        )

    @property
    def config(self) -> GroupedEmbeddingConfig:
        return self._config

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``(F, B, L)`` features of this group's tables -> ``(B, sum of feature dims)``."""
        # No validation here: the sending ranks checked the ids before the input all-to-all
        # (ShardedTTEmbeddingBagCollection.input_dist, when validate_inputs is on).
        pooled = [
            self.embedding_bags[table.name].forward_features(kjt, self._config.is_weighted, validate=False)
            for table, kjt in zip(self._tables, features.split(self._feature_splits))
        ]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)

    def flush(self) -> None:  # called by TorchRec's lookup; TT cores hold no cache
        pass

    def purge(self) -> None:
        pass
