"""``torch.autograd.gradcheck`` (float64, tiny shapes) of ``tt_embedding_bag``.

Finite differences against the registered backward (compiled
``tt_embedding_bag_backward`` when the extension is built, autograd through the
pure-PyTorch kernels otherwise).
"""

import pytest
import torch

from torchrec_tt import tt_embedding_bag
from tt_testing import DEVICES, random_cores

LAYOUTS = {
    "d2": ([3, 2], [2, 2], [2]),
    "d3": ([2, 3, 2], [1, 2, 2], [2, 3]),
    "d4": ([2, 1, 2, 2], [1, 2, 1, 2], [2, 2, 2]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", ["tt", "grt"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_gradcheck(layout, variant, pooling, weighted, device):
    p, q, ranks = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(len(p))
    cores = [c.requires_grad_(True) for c in random_cores(p, q, ranks, generator=gen, device=device)]
    rows = 1
    for m in p:
        rows *= m
    # Bags: repeated rows, rows of one group, an empty bag, a full spread.
    indices = torch.tensor([0, 1, 1, rows - 1, 2, rows - 2, 0], device=device) % rows
    offsets = torch.tensor([0, 3, 3, 5, 7], device=device)
    inputs = list(cores)
    if weighted:
        psw = torch.rand(indices.numel(), generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
        inputs.append(psw)

    def fn(*args):
        weights = args[len(cores)] if weighted else None
        return tt_embedding_bag(list(args[: len(cores)]), indices, offsets, weights, pooling=pooling, variant=variant)

    # Full Jacobians on the smallest layout; randomized projections (fast_mode) elsewhere.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=layout != "d2")
