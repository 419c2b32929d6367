"""Sharder of :class:`~torchrec_tt.modules.TTEmbeddingBagCollection` (table-wise or data-parallel, TT kernel)."""

import math
from typing import Dict, List, Optional, Type

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder
from torchrec.distributed.types import ParameterSharding, ShardingEnv

from torchrec_tt.distributed.optimizer import resolve_optimizer
from torchrec_tt.distributed.sharded_module import (
    TT_COMPUTE_KERNEL,
    TT_SHARDING_TYPES,
    ShardedTTEmbeddingBagCollection,
    table_fused_params,
)
from torchrec_tt.modules import TTEmbeddingBagCollection
from torchrec_tt.tt_shapes import tt_num_params

# Attribute of the planner's stand-in parameter that points at the table's TT config.
TT_CONFIG_ATTR = "_tt_config"


class TTEmbeddingBagCollectionSharder(BaseEmbeddingSharder[TTEmbeddingBagCollection]):
    """Shards the tables of a :class:`~torchrec_tt.modules.TTEmbeddingBagCollection`.

    Each table is ``table_wise`` (on one rank, lookups through the all-to-alls) or
    ``data_parallel`` (replicated; each rank computes its own batch; needs a fused
    optimizer); :func:`~torchrec_tt.distributed.make_tt_planner` picks per table from cost.

    Tables run the TT kernel under TorchRec's ``customized_kernel`` tag; plan them with
    :func:`torchrec_tt.distributed.make_tt_planner` (TorchRec's default estimators do
    not know that kernel). ``fused_params`` configure the cores' in-backward optimizer
    with TorchRec's keys, e.g. ``{"optimizer": EmbOptimType.EXACT_ADAGRAD,
    "learning_rate": 0.1}``; an optimizer applied to the unsharded cores with
    ``apply_optimizer_in_backward`` takes precedence.

    Example::

        sharders = [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
        plan = make_tt_planner(topology, batch_size=512).collective_plan(model, sharders, pg)
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg),
                                       plan=plan, sharders=sharders, device=device)
    """

    def shard(
        self,
        module: TTEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedTTEmbeddingBagCollection:
        return ShardedTTEmbeddingBagCollection(
            module,
            params,
            env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
        )

    def shardable_parameters(self, module: TTEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        """One ``meta`` stand-in parameter per table, for the planner.

        Its shape is ``(ceil((core elements + cached elements) / embedding_dim), embedding_dim)``:
        an uncompressed table with the bytes of the TT cores and the hot-row cache, so TorchRec's size accounting
        (plan stats, storage) sees the real table size. It carries the table's config
        (``_tt_config``, for the TT estimators) and the cores' optimizer as
        ``_optimizer_classes``/``_optimizer_kwargs`` (TorchRec's convention).
        """
        params = {}
        for config in module.embedding_bag_configs():
            # Cores plus the cached rows (the cache's int64 ids are priced by TTStorageEstimator).
            elements = tt_num_params(config.tt_p_shapes, config.tt_q_shapes, config.tt_ranks) + config.cache_rows * config.embedding_dim
            rows = math.ceil(elements / config.embedding_dim)
            param = nn.Parameter(torch.empty(rows, config.embedding_dim, device="meta"))
            setattr(param, TT_CONFIG_ATTR, config)
            spec = resolve_optimizer(table_fused_params(module.embedding_bags[config.name], self.fused_params), config.name)
            if spec is not None:
                param._optimizer_classes = [spec[0]]  # pyre-ignore[16]
                param._optimizer_kwargs = [spec[1]]  # pyre-ignore[16]
            params[config.name] = param
        return params

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(TT_SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [TT_COMPUTE_KERNEL.value]

    @property
    def module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection
