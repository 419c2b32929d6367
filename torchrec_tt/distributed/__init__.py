"""Distributed TT embedding bags: sharder, sharded module, planner estimators, checkpoints.

Tables of a :class:`~torchrec_tt.TTEmbeddingBagCollection` are sharded table-wise or
data-parallel (the planner picks per table from cost) under TorchRec's
``customized_kernel`` tag, next to regular TorchRec tables, with one planner call and
``DistributedModelParallel``::

    sharders = [
        TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD,
                                                      "learning_rate": 0.05}),
        EmbeddingBagCollectionSharder(fused_params={...}),
    ]
    topology = Topology(world_size=world_size, compute_device="cuda")
    plan = make_tt_planner(topology, batch_size=512, constraints=constraints,
                           sample_batch=kjt).collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), plan=plan,
                                   sharders=sharders, device=device)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=1e-3))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])  # TT cores step in backward

    # Checkpoint at any world size (both calls are collectives):
    state = {"model": dmp.state_dict(), "tt_optimizer": tt_optimizer_state_dict(dmp)}
    # ... later, any world size, or the unsharded model:
    dmp.load_state_dict(state["model"]); load_tt_optimizer_state_dict(dmp, state["tt_optimizer"])
"""

from torchrec_tt.distributed.checkpoint import load_tt_optimizer_state_dict, tt_optimizer_state_dict  # noqa: F401
from torchrec_tt.distributed.embedding_kernel import TTEmbeddingBagKernel  # noqa: F401
from torchrec_tt.distributed.optimizer import TTFusedOptimizer  # noqa: F401
from torchrec_tt.distributed.planner import (  # noqa: F401
    GroupStats,
    TTPerfEstimator,
    TTStorageEstimator,
    make_tt_planner,
    measure_group_stats,
    table_op_counts,
    tt_allreduce_ms,
    tt_compute_ms,
    tt_shard_storage,
    tt_table_bytes,
)
from torchrec_tt.distributed.sharded_module import ShardedTTEmbeddingBagCollection  # noqa: F401
from torchrec_tt.distributed.sharder import TTEmbeddingBagCollectionSharder  # noqa: F401
from torchrec_tt.distributed.shm_all_reduce import ShmAllReduce, ShmDataParallelWrapper, host_all_reduce_  # noqa: F401
