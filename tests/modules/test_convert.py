"""``convert_ebc_to_tt``: trained EmbeddingBagCollection tables -> TT tables, checked against the
dense model's outputs and the dense weights."""

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_tt import (
    MixedEmbeddingBagCollection,
    TTEmbeddingBagCollection,
    convert_ebc_to_tt,
    suggest_tt_shapes,
    tt_to_dense,
)
from tt_testing import random_cores


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sparse = EmbeddingBagCollection([
            EmbeddingBagConfig(name="low", num_embeddings=1000, embedding_dim=16, feature_names=["a", "b"]),
            EmbeddingBagConfig(name="rand", num_embeddings=300, embedding_dim=8, feature_names=["c"]),
        ])

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.sparse(kjt).values()


def _model() -> Model:
    torch.manual_seed(0)
    model = Model()
    p, q = suggest_tt_shapes(1000, 16, 3)
    cores = random_cores(p, q, [4, 4], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a "trained" table of TT rank 4: exactly representable
        model.sparse.embedding_bags["low"].weight.copy_(tt_to_dense(cores, 1000).float())
    return model


def _kjt() -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 5, (3 * 6,), generator=g)
    return KeyedJaggedTensor(keys=["c", "a", "b"], values=torch.randint(0, 300, (int(lengths.sum()),), generator=g), lengths=lengths)


def test_error_target_picks_smallest_rank_and_keeps_outputs() -> None:
    model, kjt = _model(), _kjt()
    want = model(kjt)
    dense_low = model.sparse.embedding_bags["low"].weight.detach().clone()
    report = convert_ebc_to_tt(model, tables=["low"], max_rel_error=1e-4)
    assert isinstance(model.sparse, MixedEmbeddingBagCollection)
    assert list(report) == ["low"] and report["low"]["tt_ranks"] == [4, 4]
    rows = model.sparse.tt.full_weight("low")
    measured = float((rows - dense_low).norm() / dense_low.norm())
    assert report["low"]["rel_error"] == pytest.approx(measured, abs=1e-6) and measured < 1e-4
    assert report["low"]["compression"] == pytest.approx(report["low"]["dense_bytes"] / report["low"]["tt_bytes"])
    got = model(kjt)
    torch.testing.assert_close(got[:, :32], want[:, :32], atol=1e-5, rtol=1e-4)  # a, b: TT
    torch.testing.assert_close(got[:, 32:], want[:, 32:], atol=0, rtol=0)        # c: still dense
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_memory_budget_picks_largest_fitting_rank() -> None:
    model = _model()
    budget = 20_000
    report = convert_ebc_to_tt(model, memory_budget=budget, ranks=[2, 4, 8, 16])
    assert isinstance(model.sparse, TTEmbeddingBagCollection)
    assert sum(r["tt_bytes"] for r in report.values()) <= budget
    assert sum(p.numel() * 4 for p in model.sparse.parameters()) == sum(r["tt_bytes"] for r in report.values())
    # one rank step up would not fit
    assert set(report) == {"low", "rand"}


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="give memory_budget \\(bytes\\) or max_rel_error, got neither"):
        convert_ebc_to_tt(_model())
    with pytest.raises(ValueError, match=r"tables \['nope'\] are not in the model's EmbeddingBagCollections"):
        convert_ebc_to_tt(_model(), tables=["nope"], max_rel_error=0.1)
    with pytest.raises(ValueError, match=r"memory_budget=10 bytes is below the \d+ bytes of tables \['low', 'rand'\] at rank 2"):
        convert_ebc_to_tt(_model(), memory_budget=10)
