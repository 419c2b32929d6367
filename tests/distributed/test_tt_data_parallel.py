"""Data-parallel TT tables (alone and mixed with table-wise ones) on 2 CPU ranks (gloo).

Every rank builds the unsharded reference and every rank's batch, trains the reference
on the global batch with the mean over ranks of the per-rank losses (what table-wise
all-to-alls and the data-parallel gradient average both amount to) and checks outputs
and parameters after every step; and that data-parallel tables cost no all-to-all, one
all-reduce per step, and keep identical optimizer state on every rank.
"""

import copy
import os
import tempfile
import unittest
from contextlib import contextmanager
from typing import Dict, Iterator

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from tt_dist_testing import (
    FailFastMultiProcessTestBase,
    ATOL,
    BATCH_SIZE,
    SparseArch,
    concat_kjts,
    interleaved_plan,
    loss_weights,
    rank_batches,
    rank_context,
    reference_loss,
    shard,
    train_step,
    tt_tables,
)
import torchrec_tt.distributed.optimizer as tt_optimizer
from torchrec_tt.ops import HAS_EXTENSION
from torchrec_tt.distributed import (
    ShardedTTEmbeddingBagCollection,
    ShmAllReduce,
    TTEmbeddingBagCollectionSharder,
    load_tt_optimizer_state_dict,
    tt_optimizer_state_dict,
)

ADAGRAD = {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8}
ALL_DP = {"t0": "dp", "t1": "dp", "t2": "dp"}
MIXED = {"t0": "dp", "t1": 0, "t2": 1}  # two table-wise tables on different ranks
WIDTH = 3  # dense head output


@contextmanager
def count_collectives() -> Iterator[Dict[str, int]]:
    """Count calls of ``all_reduce`` and ``all_to_all_single`` (TorchRec's all-to-alls use it),
    and the data-parallel gradient syncs (``host_all_reduce_``: shared memory or gloo)."""
    counts = {"all_reduce": 0, "all_to_all_single": 0, "gradient_sync": 0}
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_to_all_single")}
    original_sync = tt_optimizer.host_all_reduce_

    def counting(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    tt_optimizer.host_all_reduce_ = counting("gradient_sync", original_sync)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        tt_optimizer.host_all_reduce_ = original_sync


def _sharded_tt(dmp) -> ShardedTTEmbeddingBagCollection:
    return dmp.module.tt


def _train_and_compare(ctx, placements, variant: str, seed: int) -> None:
    rank, world_size = ctx.rank, ctx.world_size
    torch.manual_seed(seed)
    ref = SparseArch(tt_tables(variant), dense=True)
    model = copy.deepcopy(ref)
    sharders = [TTEmbeddingBagCollectionSharder(fused_params=ADAGRAD)]
    dmp = shard(model, ctx.pg, interleaved_plan(model, world_size, *sharders, tt_ranks=placements), sharders, ctx.device)
    tt = _sharded_tt(dmp)
    assert {t: tt.sharding_type(t) for t in placements} == {
        t: "data_parallel" if p == "dp" else "table_wise" for t, p in placements.items()
    }
    dense = torch.optim.SGD(dmp.module.dense.parameters(), lr=0.05)
    ref_optimizers = [
        torch.optim.Adagrad([p for n, p in ref.named_parameters() if ".cores." in n], lr=0.1, eps=1e-8),
        torch.optim.SGD(ref.dense.parameters(), lr=0.05),
    ]
    for step in range(2):
        batches = rank_batches(ref, world_size, seed=seed * 10 + step)
        weights = loss_weights(world_size, WIDTH, seed=seed * 10 + step)
        with count_collectives() as counts:
            out = dmp(batches[rank])
            (out * weights[rank]).sum().backward()
        # One gradient all-reduce per step for all the data-parallel cores, through shared
        # memory when the ranks share the host, else gloo (DDP's reducer, which averages the
        # dense head, calls its comm hook or the process group, not dist.all_reduce).
        if all(p == "dp" for p in placements.values()):
            assert counts["all_to_all_single"] == 0, counts
        else:
            assert counts["all_to_all_single"] > 0, counts
        syncs = 1 if world_size > 1 and "dp" in placements.values() else 0
        assert counts["gradient_sync"] == syncs, counts
        assert counts["all_reduce"] == (0 if ShmAllReduce.for_group(ctx.pg) is not None else syncs), counts
        dense.step()
        dense.zero_grad()
        ref_out = ref(concat_kjts(batches))
        torch.testing.assert_close(out, ref_out[rank * BATCH_SIZE : (rank + 1) * BATCH_SIZE], atol=ATOL, rtol=0)
        reference_loss(ref_out, weights).backward()
        for o in ref_optimizers:
            o.step()
            o.zero_grad()
        expected = dict(ref.named_parameters())
        for key, param in dmp.named_parameters():
            torch.testing.assert_close(param, expected[key], atol=ATOL, rtol=0, msg=f"{placements} step {step}: {key}")

    # Data-parallel cores and their optimizer state are identical on every rank.
    local = {k: v for k, v in tt.optimizer_state_dict().items() if tt.sharding_type(k.split(".")[1]) == "data_parallel"}
    local.update({f"param:{k}": v.detach() for k, v in tt.named_parameters() if tt.sharding_type(k.split(".")[1]) == "data_parallel"})
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local, group=ctx.pg)
    for other in gathered:
        assert other.keys() == local.keys()
        for key, value in local.items():
            if isinstance(value, dict):
                for name, tensor in value.items():
                    assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(other[key][name])), (key, name)
            else:
                assert torch.equal(value, other[key]), key


def _training_worker(rank: int, world_size: int, shared_memory: bool) -> None:
    os.environ["TORCHREC_TT_SHM_ALLREDUCE"] = "1" if shared_memory else "0"  # read on first use
    with rank_context(rank, world_size) as ctx:
        assert (ShmAllReduce.for_group(ctx.pg) is not None) == (shared_memory and HAS_EXTENSION)
        _train_and_compare(ctx, ALL_DP, "grt", seed=1)
        _train_and_compare(ctx, MIXED, "tt", seed=2)


# ---------------------------------------------------------------------------- checkpoints
def _model(seed: int) -> SparseArch:
    torch.manual_seed(seed)
    return SparseArch(tt_tables("grt"))


def _checkpoint_worker(rank: int, world_size: int, path: str) -> None:
    """Train under one plan, save; load under the other plan (and back): bit-exact state, and the
    same outputs up to float rounding: a table that moves between data-parallel and table-wise
    is computed over another batch (one rank's bags or every rank's), and the grt kernels' order
    of summation in a bag depends on the batch (each slot takes the row or the segment path from
    the whole batch's counts)."""
    with rank_context(rank, world_size) as ctx:
        sharders = [TTEmbeddingBagCollectionSharder(fused_params=ADAGRAD)]
        width = 16 * 2 + 8 + 12
        for save_plan, load_plan in ((MIXED, None), (ALL_DP, MIXED)):
            model = _model(seed=7)
            dmp = shard(model, ctx.pg, interleaved_plan(model, world_size, *sharders, tt_ranks=save_plan), sharders, ctx.device)
            for step in range(2):
                train_step(dmp, rank_batches(model, world_size, seed=70 + step)[rank], loss_weights(world_size, width, 70 + step)[rank])
            state = {k: v.clone() for k, v in dmp.state_dict().items()}
            optimizer_state = tt_optimizer_state_dict(dmp)
            batch = rank_batches(model, world_size, seed=99)[rank]
            expected = dmp(batch)
            if rank == 0:
                torch.save({"model": state, "optimizer": optimizer_state, "global": concat_kjts(rank_batches(model, world_size, seed=99))}, path)

            placements = load_plan or {"t0": 1, "t1": 1, "t2": 0}  # save DP+TW, load TW only
            fresh = _model(seed=123)
            loaded = shard(fresh, ctx.pg, interleaved_plan(fresh, world_size, *sharders, tt_ranks=placements), sharders, ctx.device)
            loaded.load_state_dict(state)
            load_tt_optimizer_state_dict(loaded, optimizer_state)
            for key, value in loaded.state_dict().items():
                assert torch.equal(value, state[key]), key
            reloaded = tt_optimizer_state_dict(loaded)
            assert reloaded.keys() == optimizer_state.keys()
            for key, value in optimizer_state.items():
                for name, tensor in value.items():
                    assert torch.equal(torch.as_tensor(reloaded[key][name]), torch.as_tensor(tensor)), (key, name)
            torch.testing.assert_close(loaded(batch), expected, rtol=1e-6, atol=1e-6)
            dist.barrier(group=ctx.pg)


def _load_one_rank_worker(rank: int, world_size: int, path: str) -> None:
    """A 2-rank data-parallel checkpoint under one rank, all tables data-parallel."""
    with rank_context(rank, world_size) as ctx:
        saved = torch.load(path, weights_only=False)
        sharders = [TTEmbeddingBagCollectionSharder(fused_params=ADAGRAD)]
        model = _model(seed=5)
        dmp = shard(model, ctx.pg, interleaved_plan(model, world_size, *sharders, tt_ranks=ALL_DP), sharders, ctx.device)
        dmp.load_state_dict(saved["model"])
        load_tt_optimizer_state_dict(dmp, saved["optimizer"])
        plain = _model(seed=6)
        plain.load_state_dict(saved["model"])
        assert torch.equal(dmp(saved["global"]), plain(saved["global"]))


class TTDataParallelTest(FailFastMultiProcessTestBase):
    def test_training_matches_unsharded_data_parallel_and_mixed(self) -> None:
        self._run_multi_process_test(callable=_training_worker, world_size=2, shared_memory=True)

    def test_training_matches_unsharded_through_gloo(self) -> None:
        self._run_multi_process_test(callable=_training_worker, world_size=2, shared_memory=False)

    def test_checkpoints_load_across_sharding_types_and_world_sizes(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            self._run_multi_process_test(callable=_checkpoint_worker, world_size=2, path=path)
            self._run_multi_process_test(callable=_load_one_rank_worker, world_size=1, path=path)


if __name__ == "__main__":
    unittest.main()
