"""Tracing a model with TT tables, default settings (``validate_inputs=True``).

``torch.compile(fullgraph=True)`` (0 graph breaks, outputs and gradients equal to eager),
``torch.export`` strict and non-strict with a dynamic batch (saved, loaded, equal to eager),
``torch.fx.symbolic_trace`` and ``torchrec.fx.symbolic_trace``. The reference is always the
eager module.
"""

import copy
import io
from typing import List

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torchrec.fx
from torch import nn
from torchrec import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.ops import HAS_EXTENSION

KEYS = ["f2", "f0", "f1"]  # not the tables' order: the module permutes


def _tables(pooling: str = "sum") -> List[TTEmbeddingBagConfig]:
    from torchrec.modules.embedding_configs import PoolingType

    pool = PoolingType.SUM if pooling == "sum" else PoolingType.MEAN
    return [
        TTEmbeddingBagConfig(name="t0", num_embeddings=100, embedding_dim=8, feature_names=["f0", "f1"],
                             tt_ranks=[4, 4], pooling=pool),
        TTEmbeddingBagConfig(name="t1", num_embeddings=60, embedding_dim=8, feature_names=["f2"],
                             tt_ranks=[4, 4], variant="tt", pooling=pool),
    ]


def _kjt(batch: int, seed: int, weighted: bool = False, keys: List[str] = KEYS) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    lengths[0] = 0  # an empty bag
    n = int(lengths.sum())
    values = torch.randint(0, 60, (n,), generator=g)
    weights = torch.rand(n, generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


class DLRM(nn.Module):
    """Dense arch + TT EBC + concatenation interaction + over arch -> logits ``(B,)``."""

    def __init__(self, ebc: TTEmbeddingBagCollection) -> None:
        super().__init__()
        self.ebc = ebc
        self.dense = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.over = nn.Linear(8 + 24, 1)

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        sparse = self.ebc(features).values()
        return self.over(torch.cat([self.dense(dense), sparse], dim=1)).squeeze(1)


class DLRMFromTensors(DLRM):
    """The same, built from ``values``/``lengths`` tensors (the KJT is made inside)."""

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(dense, KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths))


def _model(cls=DLRM, **kw) -> DLRM:
    torch.manual_seed(0)
    return cls(TTEmbeddingBagCollection(_tables(**kw)))


requires_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="tracing needs the compiled ops")


@requires_extension
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", True)])
def test_compile_fullgraph_forward_backward_matches_eager(pooling: str, weighted: bool) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(_tables(pooling), is_weighted=weighted)
    ref = copy.deepcopy(ebc)

    def loss(m: TTEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = m(kjt).values()
        return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()

    explained = torch._dynamo.explain(lambda k: loss(ebc, k))(_kjt(3, 0, weighted))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda k: loss(ebc, k), fullgraph=True, backend=counter)
    for batch, seed in ((3, 0), (5, 1), (7, 2)):
        kjt = _kjt(batch, seed, weighted)
        for m in (ebc, ref):
            m.zero_grad()
        got = compiled(kjt)
        got.backward()
        want = loss(ref, kjt)
        want.backward()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        for (name, p), q in zip(ebc.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert counter.frame_count >= 1  # compiled (a recompile per new shape kind is allowed)


@requires_extension
def test_compile_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    model = _model()
    dense, kjt = torch.randn(4, 4), _kjt(4, 3)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(dense, kjt), model(dense, kjt), atol=1e-6, rtol=1e-5)


def _roundtrip(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


@requires_extension
@pytest.mark.parametrize("strict", [False, True])
def test_export_dlrm_from_tensors_dynamic_batch(strict: bool) -> None:
    model = _model(DLRMFromTensors).eval()
    kjt = _kjt(4, 0)
    batch = torch.export.Dim("batch", min=2, max=4096)
    ep = torch.export.export(
        model,
        (torch.randn(4, 4), kjt.values(), kjt.lengths()),
        dynamic_shapes={"dense": {0: batch}, "values": {0: torch.export.Dim("ids")}, "lengths": {0: 3 * batch}},
        strict=strict,
    )
    loaded = _roundtrip(ep).module()
    # Exported programs take batches >= 2 (torch's 0/1 specialization; strict export does it
    # even for ``x * 2``): export a static batch-1 program for single requests.
    for b, seed in ((4, 0), (2, 5), (9, 6), (33, 7)):
        kjt, dense = _kjt(b, seed), torch.randn(b, 4)
        torch.testing.assert_close(loaded(dense, kjt.values(), kjt.lengths()), model(dense, kjt.values(), kjt.lengths()),
                                   atol=1e-6, rtol=0)


@requires_extension
@pytest.mark.parametrize("strict", [False, True])
def test_export_dlrm_kjt_input(strict: bool) -> None:
    model = _model(pooling="mean").eval()
    kjt = _kjt(4, 0)
    batch = torch.export.Dim("batch", min=2, max=4096)
    ep = torch.export.export(
        model,
        (torch.randn(4, 4), kjt),
        dynamic_shapes={"dense": {0: batch}, "features": [{0: torch.export.Dim("ids")}, None, {0: 3 * batch}, None, None, None]},
        strict=strict,
    )
    loaded = _roundtrip(ep).module()
    for b, seed in ((4, 0), (2, 8), (17, 9)):
        kjt, dense = _kjt(b, seed), torch.randn(b, 4)
        torch.testing.assert_close(loaded(dense, kjt), model(dense, kjt), atol=1e-6, rtol=0)


@pytest.mark.parametrize("trace", [torch.fx.symbolic_trace, torchrec.fx.symbolic_trace])
def test_fx_symbolic_trace_matches_eager_and_still_validates(trace) -> None:
    model = _model()
    gm = trace(model)
    for b, seed in ((3, 0), (6, 1)):
        kjt, dense = _kjt(b, seed), torch.randn(b, 4)
        torch.testing.assert_close(gm(dense, kjt), model(dense, kjt), atol=0, rtol=0)
    bad = _kjt(2, 0)
    bad = KeyedJaggedTensor(keys=KEYS, values=torch.full_like(bad.values(), 99), lengths=bad.lengths())
    with pytest.raises(ValueError, match=r"table 't1', feature 'f2': ids must be in \[0, 60\), got index 99"):
        gm(torch.randn(2, 4), bad)


@requires_extension
def test_bf16_tables_trace_and_compile() -> None:
    from torchrec.modules.embedding_configs import DataType

    torch._dynamo.reset()
    torch.manual_seed(0)
    tables = [TTEmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim,
                                   feature_names=t.feature_names, tt_ranks=t.tt_ranks, variant=t.variant,
                                   data_type=DataType.BF16) for t in _tables()]
    ebc = TTEmbeddingBagCollection(tables)
    kjt = _kjt(5, 1)
    want = ebc(kjt).values()
    torch.testing.assert_close(torch.fx.symbolic_trace(ebc)(kjt).values(), want, atol=0, rtol=0)
    explained = torch._dynamo.explain(lambda k: ebc(k).values())(kjt)
    assert explained.graph_break_count == 0
    got = torch.compile(lambda k: ebc(k).values(), fullgraph=True, backend="aot_eager")(kjt)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
