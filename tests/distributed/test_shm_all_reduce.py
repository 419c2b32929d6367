"""The shared-memory all-reduce of CPU ranks on one host (torchrec_tt.distributed.shm_all_reduce).

Against gloo's ``dist.all_reduce`` on the same tensors (bit-identical with two ranks; with
three, equal to the rank-order sum of the gathered inputs, and identical on every rank), over
sizes that regrow the segment; the fallbacks; a rank that never arrives; DDP's buckets through
``ShmDataParallelWrapper`` against gloo's DDP.
"""

import os
import tempfile
import time
import unittest
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ShardingEnv

from tt_dist_testing import FailFastMultiProcessTestBase, rank_context
from torchrec_tt.distributed import ShmAllReduce, ShmDataParallelWrapper, host_all_reduce_
from torchrec_tt.ops import HAS_EXTENSION

# 1 element, odd sizes, and sizes past the first 1 MiB slot (float32 and float64) so that the
# segment is recreated twice.
SIZES = (1, 7, 1000, 65_537, 300_000, 1_000_000)


def _rank_tensor(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * rank + numel), dtype=dtype)


def _sums_worker(rank: int, world_size: int) -> None:
    with rank_context(rank, world_size) as ctx:
        shm = ShmAllReduce.for_group(ctx.pg)
        assert shm is not None and ShmAllReduce.for_group(ctx.pg) is shm  # decided once per group
        for numel in SIZES:
            for dtype in (torch.float32, torch.float64):
                x = _rank_tensor(rank, numel, dtype)
                expected = x.clone()
                dist.all_reduce(expected, group=ctx.pg)
                inputs = [torch.empty_like(x) for _ in range(world_size)]
                dist.all_gather(inputs, x, group=ctx.pg)
                rank_order = inputs[0].clone()
                for other in inputs[1:]:
                    rank_order += other
                assert shm.all_reduce_(x) is x
                torch.testing.assert_close(x, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
                assert torch.equal(x, rank_order), (numel, dtype)
                if world_size == 2:  # a + b == b + a: exactly gloo's result
                    assert torch.equal(x, expected), (numel, dtype)
                everyone = [torch.empty_like(x) for _ in range(world_size)]
                dist.all_gather(everyone, x, group=ctx.pg)
                assert all(torch.equal(x, other) for other in everyone)
        # 2-D and a 0-element tensor; host_all_reduce_ takes gloo for what shared memory does
        # not hold (integers, non-contiguous), with the same results.
        matrix = torch.full((3, 5), float(rank + 1))
        host_all_reduce_(matrix, ctx.pg)
        assert torch.equal(matrix, torch.full((3, 5), float(world_size * (world_size + 1) // 2)))
        empty = torch.empty(0)
        assert host_all_reduce_(empty, ctx.pg).numel() == 0
        counts = torch.arange(4, dtype=torch.int64) * (rank + 1)
        host_all_reduce_(counts, ctx.pg)
        assert torch.equal(counts, torch.arange(4) * (world_size * (world_size + 1) // 2))
        strided = torch.full((4, 2), float(rank + 1)).t()
        host_all_reduce_(strided, ctx.pg)
        assert torch.equal(strided, torch.full((2, 4), float(world_size * (world_size + 1) // 2)))
        # The op itself asks for what it holds.
        for bad in (torch.ones(3, dtype=torch.int64), torch.ones(4, 2).t()):
            try:
                shm.all_reduce_(bad)
            except ValueError as err:
                assert "contiguous float32/float64 CPU tensor" in str(err), err
            else:
                raise AssertionError(f"accepted {bad.dtype} contiguous={bad.is_contiguous()}")
        # Nothing is left in /dev/shm: the segment's file is unlinked once mapped.
        dist.barrier(group=ctx.pg)
        leftovers = [f for f in os.listdir("/dev/shm") if f.startswith("torchrec_tt_allreduce_")]
        assert not leftovers, leftovers


def _late_rank_worker(rank: int, world_size: int) -> None:
    """Rank 1 skips an all-reduce: rank 0 raises after its timeout instead of hanging."""
    with rank_context(rank, world_size) as ctx:
        shm = ShmAllReduce(ctx.pg, timeout=timedelta(seconds=1))
        x = torch.ones(10)
        shm.all_reduce_(x)  # both ranks: maps the segment, step 1
        assert torch.equal(x, torch.full((10,), float(world_size)))
        if rank == 0:
            start = time.perf_counter()
            try:
                shm.all_reduce_(torch.ones(10))
            except RuntimeError as err:
                assert "rank 1 did not reach all-reduce step 2" in str(err), err
            else:
                raise AssertionError("no error although rank 1 never arrived")
            assert time.perf_counter() - start < 30
        dist.barrier(group=ctx.pg)


def _no_segment_worker(rank: int, world_size: int) -> None:
    """Rank 0 cannot create the segment: every rank raises, none waits forever."""
    import torchrec_tt.distributed.shm_all_reduce as shm_module

    with rank_context(rank, world_size) as ctx:
        if rank == 0:
            shm_module._SHM_DIR = "/nonexistent-torchrec-tt-dir"
        try:
            ShmAllReduce(ctx.pg).all_reduce_(torch.ones(4))
        except RuntimeError as err:
            assert "rank 0 could not create" in str(err) and "TORCHREC_TT_SHM_ALLREDUCE=0" in str(err), err
        else:
            raise AssertionError("no error without a segment")


def _other_shm_worker(rank: int, world_size: int) -> None:
    """Rank 1 maps another file (as in a container with its own /dev/shm): every rank raises."""
    with rank_context(rank, world_size) as ctx:
        if rank == 1:
            real_from_file = torch.from_file

            def elsewhere(path, shared, size, dtype):
                with tempfile.NamedTemporaryFile(dir="/dev/shm") as other:
                    return real_from_file(other.name, shared=shared, size=size, dtype=dtype)

            torch.from_file = elsewhere
        try:
            ShmAllReduce(ctx.pg).all_reduce_(torch.ones(4))
        except RuntimeError as err:
            assert "rank 1 does not share rank 0's /dev/shm" in str(err), err
        else:
            raise AssertionError("no error although rank 1 mapped another file")


def _switch_worker(rank: int, world_size: int) -> None:
    os.environ["TORCHREC_TT_SHM_ALLREDUCE"] = "0"
    with rank_context(rank, world_size) as ctx:
        assert ShmAllReduce.for_group(ctx.pg) is None
        x = torch.full((3,), float(rank))
        host_all_reduce_(x, ctx.pg)  # gloo
        assert torch.equal(x, torch.full((3,), 1.0))


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _ddp_worker(rank: int, world_size: int) -> None:
    """DMP's DDP with the shared-memory comm hook steps exactly like DMP's default (gloo) DDP."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    with rank_context(rank, world_size) as ctx:
        env = ShardingEnv.from_process_group(ctx.pg)
        models = []
        for wrapper in (ShmDataParallelWrapper(bucket_cap_mb=1), None):  # small buckets: several per step
            torch.manual_seed(0)
            kwargs = {"data_parallel_wrapper": wrapper} if wrapper is not None else {}
            dmp = DistributedModelParallel(_Mlp(), env=env, device=torch.device("cpu"), sharders=[], **kwargs)
            hook = dmp._dmp_wrapped_module._get_ddp_logging_data().get("comm_hook")
            assert hook == ("_shm_allreduce_hook" if wrapper is not None else None), hook
            optimizer = torch.optim.SGD(dmp.parameters(), lr=0.1)
            for step in range(3):
                x = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 * step + rank))
                dmp(x).square().sum().backward()
                optimizer.step()
                optimizer.zero_grad()
            models.append(dict(dmp.named_parameters()))
        for key, value in models[0].items():
            assert torch.equal(value, models[1][key]), key


@unittest.skipUnless(HAS_EXTENSION, "the shared-memory all-reduce is a compiled op (TORCHREC_TT_DISABLE_EXTENSION=1)")
class ShmAllReduceTest(FailFastMultiProcessTestBase):
    def test_sums_match_gloo_two_ranks(self) -> None:
        self._run_multi_process_test(callable=_sums_worker, world_size=2)

    def test_sums_in_rank_order_three_ranks(self) -> None:
        self._run_multi_process_test(callable=_sums_worker, world_size=3)

    def test_missing_rank_raises_after_timeout(self) -> None:
        self._run_multi_process_test(callable=_late_rank_worker, world_size=2)

    def test_segment_failure_raises_on_every_rank(self) -> None:
        self._run_multi_process_test(callable=_no_segment_worker, world_size=2)

    def test_ranks_without_a_common_shm_raise(self) -> None:
        self._run_multi_process_test(callable=_other_shm_worker, world_size=2)

    def test_ddp_buckets_match_gloo(self) -> None:
        self._run_multi_process_test(callable=_ddp_worker, world_size=2)


class ShmAllReduceSwitchTest(FailFastMultiProcessTestBase):
    def test_env_switch_uses_gloo(self) -> None:
        self._run_multi_process_test(callable=_switch_worker, world_size=2)
