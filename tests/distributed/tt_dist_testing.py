"""Models, batches, plans and checks shared by the distributed tests and their workers.

Workers run in separate processes (TorchRec's ``MultiProcessTestBase``); everything they
use lives here, at module level, so it pickles by name.
"""

import functools
import importlib.abc
import multiprocessing
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


class _HideExtension(importlib.abc.MetaPathFinder):
    """tests/conftest.py's TORCHREC_TT_DISABLE_EXTENSION=1, for worker processes too."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchrec_tt._C":
            raise ImportError("torchrec_tt._C hidden by TORCHREC_TT_DISABLE_EXTENSION=1")
        return None


if os.environ.get("TORCHREC_TT_DISABLE_EXTENSION", "0") == "1" and "torchrec_tt" not in sys.modules:
    sys.meta_path.insert(0, _HideExtension())

import torch  # noqa: E402
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, table_wise
from torchrec.distributed.test_utils.multi_process import MultiProcessContext, MultiProcessTestBase
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan

import torchrec_tt.distributed  # noqa: F401  (imported here so the forkserver preloads it)
from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.distributed import ShmDataParallelWrapper, TTEmbeddingBagCollectionSharder

TT_KERNEL = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
ATOL = 1e-5  # float32 sharded vs unsharded
BATCH_SIZE = 6
MAX_BAG = 6


def _run_rank(worker: Callable[..., None], **kwargs: Any) -> None:
    """A rank's worker, its exception sent back as text (tracebacks may hold unpicklable frames)."""
    try:
        worker(**kwargs)
    except Exception as e:
        raise RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}") from None


class FailFastMultiProcessTestBase(MultiProcessTestBase):
    """TorchRec's ``MultiProcessTestBase`` that fails as soon as one rank fails.

    TorchRec's waits for the ranks in order, so a rank that fails while rank 0 waits for it in a
    collective held the test until gloo's 30-minute timeout. Here the other ranks are terminated
    (the pool is closed) and the failing rank's traceback is reported.
    """

    def _run_multi_process_test(self, *, callable: Callable[..., None], world_size: int = 2, **kwargs: Any) -> None:
        ctx = multiprocessing.get_context(self._mp_init_mode)
        with ctx.Pool(processes=world_size) as pool:  # leaving it terminates the workers
            pending = {
                rank: pool.apply_async(
                    functools.partial(_run_rank, callable, **kwargs, rank=rank, world_size=world_size)
                )
                for rank in range(world_size)
            }
            while pending:
                for rank, result in list(pending.items()):
                    if not result.ready():
                        continue
                    del pending[rank]
                    try:
                        result.get()
                    except Exception as e:
                        self.fail(f"rank {rank} of {world_size} failed (the other ranks were stopped):\n{e}")
                time.sleep(0.02)


def rank_context(rank: int, world_size: int, backend: str = "gloo", **kwargs) -> MultiProcessContext:
    """TorchRec's per-rank context, one intra-op thread per rank (ranks share the CPU cores;
    oversubscribed OpenMP regions make small CPU ops orders of magnitude slower)."""
    torch.set_num_threads(1)
    return MultiProcessContext(rank, world_size, backend, **kwargs)


def tt_tables(variant: str) -> List[TTEmbeddingBagConfig]:
    """Three TT tables: two features sharing one table, mean pooling, 2 and 4 cores."""
    return [
        TTEmbeddingBagConfig(
            name="t0", num_embeddings=1000, embedding_dim=16, feature_names=["f0", "f1"],
            tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 2, 4], tt_ranks=[4, 5], variant=variant,
        ),
        TTEmbeddingBagConfig(
            name="t1", num_embeddings=85, embedding_dim=8, feature_names=["f2"], pooling=PoolingType.MEAN,
            tt_p_shapes=[9, 10], tt_q_shapes=[2, 4], tt_ranks=[3], variant=variant,
        ),
        TTEmbeddingBagConfig(
            name="t2", num_embeddings=480, embedding_dim=12, feature_names=["f3"],
            tt_p_shapes=[4, 5, 4, 6], tt_q_shapes=[1, 2, 2, 3], tt_ranks=[2, 3, 3], variant=variant,
        ),
    ]


def ebc_tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name="e0", num_embeddings=60, embedding_dim=8, feature_names=["g0"])]


class SparseArch(nn.Module):
    """A TT collection, optionally beside a regular ``EmbeddingBagCollection`` and a dense layer."""

    def __init__(
        self,
        tables: List[TTEmbeddingBagConfig],
        regular: Optional[List[EmbeddingBagConfig]] = None,
        is_weighted: bool = False,
        dense: bool = False,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.tt = TTEmbeddingBagCollection(tables, is_weighted=is_weighted, validate_inputs=validate_inputs)
        self.ebc = EmbeddingBagCollection(regular, is_weighted=is_weighted) if regular else None
        width = sum(t.embedding_dim * len(t.feature_names) for t in tables + (regular or []))
        self.dense = nn.Linear(width, 3) if dense else None

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        parts = [self.tt(kjt).values()]
        if self.ebc is not None:
            parts.append(self.ebc(kjt).values())
        out = torch.cat(parts, dim=1)
        return self.dense(out) if self.dense is not None else out


def feature_sizes(model: SparseArch) -> Dict[str, int]:
    tables = list(model.tt.embedding_bag_configs()) + (list(model.ebc.embedding_bag_configs()) if model.ebc else [])
    return {f: t.num_embeddings for t in tables for f in t.feature_names}


def make_kjt(sizes: Dict[str, int], seed: int, batch_size: int = BATCH_SIZE, weighted: bool = False) -> KeyedJaggedTensor:
    """Random batch (empty bags included); keys in reverse table order to exercise permutes."""
    g = torch.Generator().manual_seed(seed)
    keys = list(reversed(list(sizes)))
    lengths = torch.randint(0, MAX_BAG + 1, (len(keys) * batch_size,), generator=g)
    values = torch.cat(
        [
            torch.randint(0, sizes[k], (int(lengths[i * batch_size : (i + 1) * batch_size].sum()),), generator=g)
            for i, k in enumerate(keys)
        ]
    )
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def concat_kjts(kjts: Sequence[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """The global batch: every rank's bags of each feature, rank after rank (as the all-to-all delivers them)."""
    keys = kjts[0].keys()
    parts = [kjt.to_dict() for kjt in kjts]
    values = torch.cat([p[k].values() for k in keys for p in parts])
    lengths = torch.cat([p[k].lengths() for k in keys for p in parts])
    weights = torch.cat([p[k].weights() for k in keys for p in parts]) if kjts[0].weights_or_none() is not None else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def rank_batches(model: SparseArch, world_size: int, seed: int, weighted: bool = False) -> List[KeyedJaggedTensor]:
    return [make_kjt(feature_sizes(model), seed * 100 + r, weighted=weighted) for r in range(world_size)]


def loss_weights(world_size: int, width: int, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return [torch.randn(BATCH_SIZE, width, generator=g) for _ in range(world_size)]


def reference_loss(out: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    """Mean over ranks of each rank's loss: what the sharded model's gradients amount to
    (the pooled all-to-all divides embedding gradients by the world size, DDP averages)."""
    rows = out.split(BATCH_SIZE)
    return sum((r * w).sum() for r, w in zip(rows, weights)) / len(weights)


def interleaved_plan(
    model: SparseArch,
    world_size: int,
    tt_sharder=None,
    ebc_sharder=None,
    device_type: str = "cpu",
    tt_ranks: Optional[Dict[str, int]] = None,
) -> ShardingPlan:
    """By default t0 -> last rank, t1 -> rank 0, t2 -> last rank (forces rank-major
    reordering), e0 -> rank 0; ``tt_ranks`` overrides the TT placements (``"dp"``:
    data-parallel)."""
    last = world_size - 1
    tt_sharder = tt_sharder or TTEmbeddingBagCollectionSharder()
    tt_ranks = tt_ranks or {"t0": last, "t1": 0, "t2": last}
    plan = {
        "tt": construct_module_sharding_plan(
            model.tt,
            {
                name: data_parallel() if rank == "dp" else table_wise(rank=rank, compute_kernel=TT_KERNEL)
                for name, rank in tt_ranks.items()
            },
            sharder=tt_sharder, local_size=world_size, world_size=world_size, device_type=device_type,
        )
    }
    for sharding in plan["tt"].values():  # TorchRec's data_parallel() picks the dense kernel
        sharding.compute_kernel = TT_KERNEL
    if model.ebc is not None:
        plan["ebc"] = construct_module_sharding_plan(
            model.ebc, {"e0": table_wise(rank=0, compute_kernel="fused")}, sharder=ebc_sharder or EmbeddingBagCollectionSharder(),
            local_size=world_size, world_size=world_size, device_type=device_type,
        )
    return ShardingPlan(plan)


def shard(model: SparseArch, pg, plan: ShardingPlan, sharders, device: torch.device) -> DistributedModelParallel:
    """Shard ``model`` in place (``copy.deepcopy`` drops in-backward optimizer attributes); DDP
    averages the dense part through shared memory where the ranks share the host (as the
    examples do)."""
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), plan=plan, sharders=sharders,
                                    device=device, data_parallel_wrapper=ShmDataParallelWrapper())


def copy_regular_tables(dmp: DistributedModelParallel, ref: SparseArch) -> None:
    """Load the unsharded EBC weights into the sharded EBC's local shards."""
    ref_state = ref.state_dict()
    for key, value in dmp.state_dict().items():
        if key.startswith("ebc.") and isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.detach().copy_(ref_state[key][r0 : r0 + nr, c0 : c0 + nc])


def local_regular_weight(dmp: DistributedModelParallel, key: str) -> Optional[Tuple[torch.Tensor, Tuple[int, int]]]:
    value = dmp.state_dict()[key]
    shards = value.local_shards()
    if not shards:
        return None
    return shards[0].tensor.detach().clone(), tuple(shards[0].metadata.shard_offsets)


def tt_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".cores." in n}


def train_step(dmp: nn.Module, kjt: KeyedJaggedTensor, weight: torch.Tensor) -> torch.Tensor:
    """Forward, backward of ``(out * weight).sum()`` (the fused optimizers step); the output."""
    out = dmp(kjt)
    (out * weight).sum().backward()
    return out.detach()
