"""TT tables next to a regular TorchRec table, planned together and sharded table-wise.

    python examples/sharded_quickstart.py            # 2 CPU ranks (gloo), ~20 s

One planner call (make_tt_planner) plans both modules; DistributedModelParallel shards
them; the TT cores train with a fused Adagrad step in backward (TorchRec's fused_params),
the dense parameters with Adam; the TT checkpoint is saved at world size 2 and loaded
into the unsharded model.
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_tt import (
    ShmDataParallelWrapper,
    TTEmbeddingBagCollection,
    TTEmbeddingBagCollectionSharder,
    TTEmbeddingBagConfig,
    make_tt_planner,
    tt_optimizer_state_dict,
)

BATCH = 32


class TwoTowers(nn.Module):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.tt = TTEmbeddingBagCollection(
            [
                TTEmbeddingBagConfig(name="movies", num_embeddings=23_100, embedding_dim=64,
                                     feature_names=["history"], tt_p_shapes=[21, 22, 50],
                                     tt_q_shapes=[4, 4, 4], tt_ranks=[32, 32]),
                TTEmbeddingBagConfig(name="users", num_embeddings=65_000, embedding_dim=64,
                                     feature_names=["user"], variant="tt"),
            ],
            device=device,
        )
        self.ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(name="genres", num_embeddings=100, embedding_dim=16, feature_names=["genre"])],
            device=device,
        )
        self.head = nn.Linear(64 + 64 + 16, 1, device=device)

    def forward(self, tt_kjt: KeyedJaggedTensor, ebc_kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(torch.cat([self.tt(tt_kjt).values(), self.ebc(ebc_kjt).values()], dim=1)).squeeze(1)


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    history_len = torch.randint(0, 45, (BATCH,), generator=g)
    tt_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["history", "user"],
        values=torch.cat([torch.randint(0, 23_100, (int(history_len.sum()),), generator=g),
                          torch.randint(0, 65_000, (BATCH,), generator=g)]),
        lengths=torch.cat([history_len, torch.ones(BATCH, dtype=torch.long)]),
    )
    ebc_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["genre"], values=torch.randint(0, 100, (BATCH,), generator=g), lengths=torch.ones(BATCH, dtype=torch.long)
    )
    return tt_kjt, ebc_kjt, torch.randint(0, 2, (BATCH,), generator=g).float()


def main(rank: int, world_size: int, ckpt: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = TwoTowers(torch.device("meta"))
    sharders = [
        TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.05}),
        # FBGEMM's CPU kernels support row-wise Adagrad (not plain Adagrad) for regular tables.
        EmbeddingBagCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}
        ),
    ]
    topology = Topology(world_size=world_size, compute_device="cpu")
    constraints = {"movies": ParameterConstraints(pooling_factors=[22.0])}
    planner = make_tt_planner(topology, batch_size=BATCH, constraints=constraints, sample_batch=batch(0, rank)[0])
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    # ShmDataParallelWrapper: DDP (the dense part) averages through shared memory between ranks of
    # one host, as the data-parallel TT tables do; elsewhere it is TorchRec's default wrapper.
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=sharders, device=device,
                                   data_parallel_wrapper=ShmDataParallelWrapper())
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=1e-3))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    loss_fn = nn.BCEWithLogitsLoss()
    for step in range(20):
        tt_kjt, ebc_kjt, label = batch(step, rank)
        loss = loss_fn(dmp(tt_kjt, ebc_kjt), label)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # Both calls are collectives. TT entries are plain tensors under unsharded keys; the
    # regular table's entries are ShardedTensors (TorchRec's own checkpointing handles them).
    model_state = {k: v for k, v in dmp.state_dict().items() if k.startswith("tt.")}
    state = {"model": model_state, "tt_optimizer": tt_optimizer_state_dict(dmp)}
    if rank == 0:
        print(plan)
        print(f"loss after 20 steps: {loss.item():.4f}")
        torch.save(state, ckpt)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    world_size = 2
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt.pt")
        mp.spawn(main, args=(world_size, ckpt), nprocs=world_size)
        # The world-size-2 checkpoint loads into the unsharded model (TT cores by their readable keys).
        unsharded = TwoTowers(torch.device("cpu"))
        state = torch.load(ckpt)["model"]
        tt_state = {k[len("tt."):]: v for k, v in state.items()}
        unsharded.tt.load_state_dict(tt_state)
        print("unsharded model loaded TT tables:", sorted({k.split(".")[1] for k in tt_state}))
        print("movies compression:", round(unsharded.tt.embedding_bag_configs()[0].compression_ratio(), 1), "x")
