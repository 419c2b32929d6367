"""Helpers shared by the tests: devices, random problems, the reference, the checkout's root.

The reference is deliberately independent of the lookup kernels: the whole table is
materialized with :func:`torchrec_tt.tt_to_dense` (whole-core contraction, no row
chains, no grouping) and pooled with ``torch.nn.functional.embedding_bag``.
"""

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from torchrec_tt import tt_to_dense

CUDA_SKIP_REASON = "CUDA is not available on this machine"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout's root


def checkout_env(**overrides: str) -> Dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH``, for child processes
    that must import this checkout's torchrec_tt whether or not it is installed."""
    env = {**os.environ, **overrides}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return env

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON),
    ),
]

# Errors raised at the op boundary for bad user values: ValueError from the pure-PyTorch
# path and from TORCH_CHECK_VALUE in the compiled ops (csrc/include/torchrec_tt/checks.h).
OP_ERRORS = ValueError


def tolerances(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    if dtype == torch.float32:
        return dict(rtol=2e-4, atol=2e-5)
    return dict(rtol=2e-2, atol=2e-2)  # half / bfloat16 (CUDA only)


def assert_message(excinfo: pytest.ExceptionInfo, *patterns: str) -> None:
    """Every regex in ``patterns`` occurs in the exception message."""
    message = str(excinfo.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not found in error message {message!r}"


# ---------------------------------------------------------------------------------------
# Random problems
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A random table layout and batch, drawn by hypothesis, materialized by ``tensors``."""

    p_shapes: Tuple[int, ...]
    q_shapes: Tuple[int, ...]
    ranks: Tuple[int, ...]  # inner ranks
    lengths: Tuple[int, ...]  # bag lengths (B of them)
    indices: Tuple[int, ...]
    seed: int

    @property
    def full_ranks(self) -> List[int]:
        return [1, *self.ranks, 1]

    @property
    def num_rows(self) -> int:
        return math.prod(self.p_shapes)

    @property
    def dim(self) -> int:
        return math.prod(self.q_shapes)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def tensors(
        self,
        dtype: torch.dtype = torch.float64,
        index_dtype: torch.dtype = torch.int64,
        device: str = "cpu",
        weighted: bool = False,
    ):
        """``(cores, indices, offsets, per_sample_weights or None)``."""
        gen = torch.Generator().manual_seed(self.seed)
        cores = random_cores(self.p_shapes, self.q_shapes, self.ranks, dtype=dtype, generator=gen, device=device)
        indices = torch.tensor(self.indices, dtype=index_dtype, device=device)
        offsets = torch.tensor([0, *_cumulative(self.lengths)], dtype=index_dtype, device=device)
        psw = None
        if weighted:
            psw = (torch.rand(len(self.indices), generator=gen, dtype=torch.float64) * 2 - 0.5).to(dtype).to(device)
        return cores, indices, offsets, psw


def _cumulative(values: Sequence[int]) -> List[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def random_cores(
    p_shapes: Sequence[int],
    q_shapes: Sequence[int],
    ranks: Sequence[int],
    dtype: torch.dtype = torch.float64,
    generator: Optional[torch.Generator] = None,
    device: str = "cpu",
) -> List[torch.Tensor]:
    """Gaussian cores ``(m_k, R[k], n_k, R[k+1])`` scaled so rows have entries of order 1."""
    full = [1, *ranks, 1]
    cores = []
    for k, (m, n) in enumerate(zip(p_shapes, q_shapes)):
        core = torch.randn(m, full[k], n, full[k + 1], generator=generator, dtype=torch.float64)
        cores.append((core / math.sqrt(full[k])).to(dtype).to(device))
    return cores


@st.composite
def problems(
    draw,
    min_cores: int = 2,
    max_cores: int = 4,
    max_m: int = 5,
    max_n: int = 3,
    max_rank: int = 4,
    max_batch: int = 5,
    max_len: int = 6,
    min_batch: int = 0,
) -> Problem:
    d = draw(st.integers(min_cores, max_cores))
    p = tuple(draw(st.lists(st.integers(1, max_m), min_size=d, max_size=d)))
    q = tuple(draw(st.lists(st.integers(1, max_n), min_size=d, max_size=d)))
    ranks = tuple(draw(st.lists(st.integers(1, max_rank), min_size=d - 1, max_size=d - 1)))
    lengths = tuple(draw(st.lists(st.integers(0, max_len), min_size=min_batch, max_size=max_batch)))
    rows = math.prod(p)
    # Draw rows from a small pool part of the time so that bags share TT groups.
    pool = draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=6))
    row = st.one_of(st.sampled_from(pool), st.integers(0, rows - 1))
    indices = tuple(draw(st.lists(row, min_size=sum(lengths), max_size=sum(lengths))))
    seed = draw(st.integers(0, 2**31 - 1))
    return Problem(p, q, ranks, lengths, indices, seed)


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------


def embedding_bag_ref(
    cores: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    pooling: str = "sum",
    cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Pooled lookups from the materialized table (differentiable w.r.t. cores and weights).

    ``F.embedding_bag`` only takes per-sample weights with ``mode="sum"``; the contract's
    weighted mean (``c_j = w_j / L_b``) is the weighted sum with the weights divided by
    the bag length. ``cache = (cache_weight, cache_ids)``: the cached rows replace the
    table's (ids past the table are empty slots; differentiable w.r.t. ``cache_weight``).
    """
    weight = tt_to_dense(list(cores))
    if cache is not None:
        cache_weight, cache_ids = cache
        held = cache_ids < weight.shape[0]
        weight = weight.index_put((cache_ids[held],), cache_weight[held].to(weight.dtype))
    idx, off = indices.to(torch.int64), offsets.to(torch.int64)
    if per_sample_weights is None:
        return F.embedding_bag(idx, weight, off, mode=pooling, include_last_offset=True)
    psw = per_sample_weights
    if pooling == "mean":
        lengths = (off[1:] - off[:-1]).clamp_min(1).to(weight.dtype)
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=idx.device), off[1:] - off[:-1])
        psw = psw / lengths[bag]
    return F.embedding_bag(idx, weight, off, mode="sum", per_sample_weights=psw, include_last_offset=True)


def grads_or_zeros(output: torch.Tensor, inputs: Sequence[torch.Tensor], grad_output: torch.Tensor):
    grads = torch.autograd.grad(output, list(inputs), grad_output, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
