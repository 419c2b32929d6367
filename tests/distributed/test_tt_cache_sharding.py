"""Sharded TT tables with a hot-row cache on 2 CPU ranks (gloo) against the unsharded module.

Forward, one fused-optimizer step (cached rows and cores), warm-up population on the owner,
and a checkpoint saved at world size 2 that loads at world size 1 and into the unsharded
module (docs/design.md, section 10); table-wise, and with a cached data-parallel table (whose
warm-up counts are summed over the ranks, so every replica caches the same rows).
"""

import copy
import dataclasses
import os
import tempfile
import unittest

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.model_parallel import get_unwrapped_module

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
    tt_tables,
)
from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder

CACHE_ROWS = {"t0": 40, "t1": 8}
LR, CACHE_LR = 0.3, 0.7


def _cached_model(seed: int) -> SparseArch:
    torch.manual_seed(seed)
    tables = [dataclasses.replace(t, cache_rows=CACHE_ROWS.get(t.name, 0)) for t in tt_tables("grt")]
    model = SparseArch(tables)
    for name, rows in CACHE_ROWS.items():
        model.tt.populate_cache(name, ids=torch.randperm(tables[0].num_embeddings if name == "t0" else 85)[: rows // 2])
        with torch.no_grad():  # cached values the cores cannot give
            model.tt.embedding_bags[name].cache_weight.add_(torch.randn_like(model.tt.embedding_bags[name].cache_weight))
    return model


MIXED = {"t0": "dp", "t1": 0, "t2": 1}  # t0 (cached) data-parallel, t1 (cached) on rank 0


def _sharded(model: SparseArch, ctx, placements=None):
    fused_params = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR, "cache_learning_rate": CACHE_LR}
    sharders = [TTEmbeddingBagCollectionSharder(fused_params=fused_params)]
    plan = interleaved_plan(model, ctx.world_size, *sharders, tt_ranks=placements)
    dmp = shard(model, ctx.pg, plan, sharders, ctx.device)
    return dmp, get_unwrapped_module(dmp).tt


def _train_worker(rank: int, world_size: int, path: str, placements=None) -> None:
    with rank_context(rank, world_size) as ctx:
        ref = _cached_model(seed=3)
        dmp, sharded = _sharded(copy.deepcopy(ref), ctx, placements)
        assert any(k.endswith("cache_weight") for k in dmp.fused_optimizer.params), list(dmp.fused_optimizer.params)
        params = dict(ref.named_parameters())
        cache = [p for n, p in params.items() if n.endswith("cache_weight")]
        optimizer = torch.optim.SGD(
            [{"params": [p for n, p in params.items() if not n.endswith("cache_weight")], "lr": LR},
             {"params": cache, "lr": CACHE_LR}]
        )
        for step in range(2):
            batches = rank_batches(ref, world_size, seed=30 + step)
            weights = loss_weights(world_size, 52, seed=30 + step)
            out = dmp(batches[rank])
            expected = ref(concat_kjts(batches))
            torch.testing.assert_close(out, expected[rank * BATCH_SIZE : (rank + 1) * BATCH_SIZE], atol=ATOL, rtol=0)
            (out * weights[rank]).sum().backward()  # the fused optimizer steps cached rows and cores
            reference_loss(expected, weights).backward()
            optimizer.step()
            optimizer.zero_grad()
        state = dmp.state_dict()
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(state[key], value, atol=ATOL, rtol=0, msg=key)

        # Warm-up: a table-wise owner sees every rank's ids, a data-parallel table sums its
        # ranks' counts: the same rows as the reference's warm-up.
        batches = rank_batches(ref, world_size, seed=40)
        sharded.start_cache_warmup()
        ref.tt.start_cache_warmup()
        with torch.no_grad():
            dmp(batches[rank])
            ref(concat_kjts(batches))
        sharded.populate_cache(on_evict="drop")
        ref.tt.populate_cache(on_evict="drop")
        state = {k: v.clone() for k, v in dmp.state_dict().items()}
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(state[key], value, atol=ATOL, rtol=0, msg=key)
        assert "tt.embedding_bags.t0.cache_ids" in state and "tt.embedding_bags.t1.cache_weight" in state
        batches = rank_batches(ref, world_size, seed=50)
        outputs = [torch.empty(BATCH_SIZE, 52) for _ in range(world_size)]
        with torch.no_grad():
            torch.distributed.all_gather(outputs, dmp(batches[rank]), group=ctx.pg)
        if rank == 0:
            torch.save({"model": state, "output": torch.cat(outputs)}, path)


def _load_worker(rank: int, world_size: int, path: str) -> None:
    with rank_context(rank, world_size) as ctx:
        saved = torch.load(path, weights_only=False)
        global_batch = concat_kjts(rank_batches(_cached_model(seed=0), 2, seed=50))
        dmp, _ = _sharded(_cached_model(seed=9), ctx)
        dmp.load_state_dict(saved["model"])
        with torch.no_grad():
            torch.testing.assert_close(dmp(global_batch), saved["output"], atol=ATOL, rtol=0)
        plain = _cached_model(seed=11)
        plain.load_state_dict(saved["model"])
        with torch.no_grad():
            torch.testing.assert_close(plain(global_batch), saved["output"], atol=ATOL, rtol=0)


class TTCacheShardingTest(FailFastMultiProcessTestBase):
    def test_cached_tables_train_populate_and_checkpoint_across_world_sizes(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            self._run_multi_process_test(callable=_train_worker, world_size=2, path=path)
            self._run_multi_process_test(callable=_load_worker, world_size=1, path=path)

    def test_cached_data_parallel_table_trains_populates_and_checkpoints(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            self._run_multi_process_test(callable=_train_worker, world_size=2, path=path, placements=MIXED)
            self._run_multi_process_test(callable=_load_worker, world_size=1, path=path)


if __name__ == "__main__":
    unittest.main()
