"""TorchRec's ``TrainPipelineSparseDist`` over a DMP model with TT tables (table-wise and
data-parallel) gives the losses of a plain training loop, step by step (2 CPU ranks, gloo)."""

import copy
import unittest
from typing import List

import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tt_dist_testing import FailFastMultiProcessTestBase, interleaved_plan, make_kjt, rank_context, shard, tt_tables
from torchrec_tt import TTEmbeddingBagCollection
from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder

STEPS = 4
BATCH = 6


class PipelinedModel(nn.Module):
    """TT lookups of ``batch.sparse_features`` + the dense features -> logits -> BCE loss."""

    def __init__(self) -> None:
        super().__init__()
        tables = tt_tables("grt")
        self.tt = TTEmbeddingBagCollection(tables)
        width = sum(t.embedding_dim * len(t.feature_names) for t in tables)
        self.ebc = None  # no regular tables (tt_dist_testing.interleaved_plan)
        self.head = nn.Linear(width + 2, 1)

    def forward(self, batch: Batch):
        pooled = self.tt(batch.sparse_features).values()
        logits = self.head(torch.cat([pooled, batch.dense_features], dim=1)).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, loss.detach()  # (what backward takes, what the pipeline returns)


def _batches(model: PipelinedModel, rank: int) -> List[Batch]:
    sizes = {f: t.num_embeddings for t in model.tt.embedding_bag_configs() for f in t.feature_names}
    out = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)
        out.append(
            Batch(
                dense_features=torch.randn(BATCH, 2, generator=g),
                sparse_features=make_kjt(sizes, seed=step * 10 + rank, batch_size=BATCH),
                labels=torch.randint(0, 2, (BATCH,), generator=g).float(),
            )
        )
    return out


def _build(ctx, placements):
    torch.manual_seed(0)
    model = PipelinedModel()
    sharders = [TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1})]
    plan = interleaved_plan(model, ctx.world_size, *sharders, tt_ranks=placements)
    dmp = shard(model, ctx.pg, plan, sharders, ctx.device)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=0.1))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def _pipeline_worker(rank: int, world_size: int) -> None:
    with rank_context(rank, world_size) as ctx:
        for placements in ({"t0": 1, "t1": 0, "t2": 1}, {"t0": "dp", "t1": 0, "t2": "dp"}):
            plain, plain_optimizer = _build(ctx, placements)
            batches = _batches(plain.module, rank)
            expected = []
            for batch in batches:
                loss, _ = plain(batch)
                plain_optimizer.zero_grad()
                loss.backward()
                plain_optimizer.step()
                expected.append(loss.detach())

            model, optimizer = _build(ctx, placements)
            pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device)
            it = iter(copy.deepcopy(batches))
            got = [pipeline.progress(it) for _ in range(STEPS)]
            assert [type(m).__name__ for m in pipeline._pipelined_modules] == ["ShardedTTEmbeddingBagCollection"]
            torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=1e-6, rtol=0, msg=str(placements))
            assert len(set(float(x) for x in got)) == STEPS  # the steps trained (losses change)
            for key, value in plain.state_dict().items():
                torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0, msg=f"{placements}: {key}")


class TTTrainPipelineTest(FailFastMultiProcessTestBase):
    def test_train_pipeline_sparse_dist_matches_plain_loop(self) -> None:
        self._run_multi_process_test(callable=_pipeline_worker, world_size=2)


if __name__ == "__main__":
    unittest.main()
