"""Launches per call of the CUDA grt ops, counted by torch.profiler on a GPU (issue: kernels).

On CPU machines these skip; CI checks the same bounds with the launch counter of the CPU-thread
emulation (`.ci/compile_cuda.sh`, csrc/cuda_check/emu_test.cpp).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import torchrec_tt
from torchrec_tt import tt_embedding_bag
from tt_testing import random_cores

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not torchrec_tt.ops.uses_extension(torch.device("cuda")),
    reason="needs a GPU and the compiled CUDA ops",
)

MAX_FORWARD_LAUNCHES = 8  # plan included
MAX_BACKWARD_LAUNCHES = 16  # plan reused


def _device_events(fn):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("p, q, ranks", [([21, 22, 50], [4, 4, 4], [32, 32]), ([7, 9], [4, 8], [16]), ([3, 4, 5, 6], [2, 2, 2, 2], [4, 4, 4])])
def test_grt_launch_counts(p, q, ranks):
    cores = [c.cuda().float().requires_grad_(True) for c in random_cores(p, q, ranks)]
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 40, (256,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]).cuda()
    rows = 1
    for m in p:
        rows *= m
    indices = torch.randint(0, rows, (int(lengths.sum()),), generator=gen).cuda()
    out = tt_embedding_bag(cores, indices, offsets, variant="grt")  # warm-up: one-time attributes
    out.sum().backward()

    for c in cores:
        c.grad = None  # AccumulateGrad then takes the op's gradient without a kernel
    holder = {}
    fwd = _device_events(lambda: holder.setdefault("out", tt_embedding_bag(cores, indices, offsets, variant="grt")))
    grad = torch.ones_like(holder["out"])
    bwd = _device_events(lambda: holder["out"].backward(grad))
    assert 0 < len(fwd) <= MAX_FORWARD_LAUNCHES, [e.name for e in fwd]
    assert 0 < len(bwd) <= MAX_BACKWARD_LAUNCHES, [e.name for e in bwd]
