"""The sharded TT path reads no device values when ``validate_inputs=False``.

On CUDA a host read of a device tensor (``.item()``, ``int(t)``, ``.tolist()``, boolean
masks, ``nonzero``, ``unique``, ...) synchronizes. This CPU test runs the sharded forward
and backward under a dispatch mode that records every ATen op that would sync (and
``Tensor.tolist``, which bypasses the dispatcher), and checks there are none per feature:
none at all for data-parallel tables and for the TT kernels of table-wise ones (TorchRec's
all-to-all reads its split sizes, once per batch). With ``validate_inputs=True`` a bad id
of a data-parallel table raises ``ValueError`` naming table, feature and value.
"""

import dataclasses
import unittest
from contextlib import contextmanager
from typing import Iterator, List

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec import KeyedJaggedTensor

from tt_dist_testing import FailFastMultiProcessTestBase, SparseArch, feature_sizes, interleaved_plan, make_kjt, rank_context, shard, tt_tables
from torchrec_tt import TTEmbeddingBagConfig
from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder
from torchrec_tt.distributed.embedding_kernel import TTEmbeddingBagKernel
import torchrec_tt.distributed.optimizer as tt_optimizer

aten = torch.ops.aten
# ATen ops whose CUDA kernels copy a value or an output size to the host.
SYNCING_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


class _SyncRecorder(TorchDispatchMode):
    def __init__(self, seen: List[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS or (func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def record_syncs() -> Iterator[List[str]]:
    """Ops that would synchronize a CUDA device, in order (``Tensor.tolist`` included)."""
    seen: List[str] = []
    tolist = torch.Tensor.tolist

    def recording_tolist(self):
        seen.append("Tensor.tolist")
        return tolist(self)

    torch.Tensor.tolist = recording_tolist
    try:
        with _SyncRecorder(seen):
            yield seen
    finally:
        torch.Tensor.tolist = tolist


@contextmanager
def outside_optimizer_steps(seen: List[str]) -> Iterator[None]:
    """Drop what torch's optimizers record (their ``step`` counters are host tensors)."""
    step_pending = tt_optimizer._step_pending

    def step(*args):
        mark = len(seen)
        step_pending(*args)
        del seen[mark:]

    tt_optimizer._step_pending = step
    try:
        yield
    finally:
        tt_optimizer._step_pending = step_pending


@contextmanager
def in_kernels(seen: List[str]) -> Iterator[List[str]]:
    """What the TT kernels' forward records."""
    kernel_seen: List[str] = []
    forward = TTEmbeddingBagKernel.forward

    def recording_forward(self, features):
        mark = len(seen)
        out = forward(self, features)
        kernel_seen.extend(seen[mark:])
        return out

    TTEmbeddingBagKernel.forward = recording_forward
    try:
        yield kernel_seen
    finally:
        TTEmbeddingBagKernel.forward = forward


def _ordered_kjt(model: SparseArch, seed: int) -> KeyedJaggedTensor:
    """A batch with its keys in table order (a different order costs one KJT permute)."""
    sizes = feature_sizes(model)
    return make_kjt(dict(reversed(list(sizes.items()))), seed)  # make_kjt reverses the keys


def _double_features(tables: List[TTEmbeddingBagConfig]) -> List[TTEmbeddingBagConfig]:
    return [dataclasses.replace(t, feature_names=t.feature_names + [f"{f}x" for f in t.feature_names]) for t in tables]


def _syncs(ctx, tables, placements, sharders):
    """(forward, backward, kernels) syncs of one sharded training step on a fresh batch."""
    torch.manual_seed(0)
    model = SparseArch(tables, validate_inputs=False)
    dmp = shard(model, ctx.pg, interleaved_plan(model, ctx.world_size, *sharders, tt_ranks=placements), sharders, ctx.device)
    batch = _ordered_kjt(model, seed=ctx.rank)
    assert list(batch.keys()) == [f for t in tables for f in t.feature_names]
    dmp(batch).sum().backward()  # warm-up: lazy initialisations
    batch = _ordered_kjt(model, seed=10 + ctx.rank)  # a fresh KJT: nothing cached on it
    with record_syncs() as seen, outside_optimizer_steps(seen), in_kernels(seen) as kernels:
        out = dmp(batch)
        forward = list(seen)
        out.sum().backward()
    return forward, seen[len(forward):], kernels


def _sync_worker(rank: int, world_size: int) -> None:
    with rank_context(rank, world_size) as ctx:
        sharders = [TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD})]
        for placements in ({"t0": "dp", "t1": "dp", "t2": "dp"}, {"t0": "dp", "t1": 0, "t2": 1}):
            forward, backward, kernels = _syncs(ctx, tt_tables("grt"), placements, sharders)
            assert kernels == [], kernels  # the TT kernels never read device values
            assert backward == [], backward  # nor does the backward (ops, all-reduce)
            # What is left is per batch, not per feature: TorchRec splitting a KJT by table
            # group (one read of its lengths per key) and, table-wise, the all-to-alls' split
            # sizes. Twice the features, the same reads.
            assert forward and set(forward) == {"Tensor.tolist"}, forward
            doubled = _syncs(ctx, _double_features(tt_tables("grt")), placements, sharders)
            assert doubled == (forward, [], []), (placements, forward, doubled)
            if all(p == "dp" for p in placements.values()):
                assert len(forward) == 1, forward  # only the group split

        # validate_inputs=True: the data-parallel rank checks its own ids.
        torch.manual_seed(0)
        model = SparseArch(tt_tables("grt"))
        dmp = shard(model, ctx.pg, interleaved_plan(model, world_size, *sharders, tt_ranks={"t0": "dp", "t1": "dp", "t2": "dp"}),
                    sharders, ctx.device)
        batch = _ordered_kjt(model, seed=rank)
        values = batch.values().clone()
        f2_start = int(batch.lengths()[: 2 * batch.stride()].sum())
        if len(values) > f2_start and int(batch.lengths()[2 * batch.stride() : 3 * batch.stride()].sum()) > 0:
            values[f2_start] = 85  # t1 has 85 rows (its TT shape holds 90)
            bad = KeyedJaggedTensor(keys=batch.keys(), values=values, lengths=batch.lengths())
            try:
                dmp(bad)
                raise AssertionError("an id beyond num_embeddings of a data-parallel table was accepted")
            except ValueError as e:
                assert "table 't1'" in str(e) and "feature 'f2'" in str(e) and "85" in str(e), e
        else:
            raise AssertionError("the batch has no f2 ids")


class TTSyncFreeTest(FailFastMultiProcessTestBase):
    def test_sharded_path_reads_no_device_values(self) -> None:
        self._run_multi_process_test(callable=_sync_worker, world_size=2)


if __name__ == "__main__":
    unittest.main()
