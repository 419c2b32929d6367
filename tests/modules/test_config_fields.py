"""``EmbeddingBagConfig`` fields on TT tables: honoured (init range) or rejected by name."""

import math

import pytest
import torch

from torchrec_tt import TTEmbeddingBag, TTEmbeddingBagConfig


@pytest.mark.parametrize("low,high", [(0.0, 0.2), (-0.3, -0.1), (0.05, 0.5), (-0.01, 0.01)])
def test_weight_init_range_gives_torchrec_uniform_row_statistics(low: float, high: float) -> None:
    """Materialized rows: mean (low+high)/2, variance (high-low)^2/12 like U(low, high); most
    entries inside [low, high] (TT rows are sums of products, not bounded like U)."""
    torch.manual_seed(0)
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=20000, embedding_dim=16, feature_names=["f"],
                               weight_init_min=low, weight_init_max=high, tt_ranks=[8, 8])
    rows = TTEmbeddingBag(cfg).full_weight()
    reference = torch.empty_like(rows).uniform_(low, high)  # TorchRec's init of the dense table
    width = high - low
    assert float(rows.mean()) == pytest.approx(float(reference.mean()), abs=0.02 * width)
    assert float(rows.std()) == pytest.approx(float(reference.std()), rel=0.15)
    # per-column means too (the offset is on every entry, not only on average)
    assert float((rows.mean(0) - (low + high) / 2).abs().max()) < 0.05 * width
    inside = float(((rows >= low) & (rows <= high)).float().mean())
    assert inside > 0.85, inside
    # measured: ~91% inside, extremes ~2 widths outside over 320k entries
    assert float(rows.min()) > low - 3 * width and float(rows.max()) < high + 3 * width


def test_off_centre_init_needs_rank_two() -> None:
    with pytest.raises(ValueError, match=r"TTEmbeddingBagConfig 't': tt_ranks=\[1, 4\] must be >= 2 for an init range not centred on 0"):
        TTEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=8, feature_names=["f"],
                             weight_init_min=0.0, weight_init_max=1.0, tt_ranks=[1, 4])
    with pytest.raises(ValueError, match=r"TTEmbeddingBagConfig 't': weight_init_min=1.0 must be <= weight_init_max=0.0"):
        TTEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=8, feature_names=["f"],
                             weight_init_min=1.0, weight_init_max=0.0)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("init_fn", torch.nn.init.zeros_, r"init_fn=<function zeros_ .*> is not supported: TT rows are products"),
        ("need_pos", True, r"need_pos=True is not supported \(no positional weights"),
        ("num_embeddings_post_pruning", 10, r"num_embeddings_post_pruning=10 is not supported by TT tables"),
        ("use_virtual_table", True, r"use_virtual_table=True is not supported by TT tables"),
    ],
)
def test_unsupported_fields_are_rejected_by_name(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"TTEmbeddingBagConfig 'big': {message}"):
        TTEmbeddingBagConfig(name="big", num_embeddings=1000, embedding_dim=8, feature_names=["f"], **{field: value})


def test_default_init_is_unchanged_symmetric() -> None:
    torch.manual_seed(0)
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=8000, embedding_dim=16, feature_names=["f"])
    rows = TTEmbeddingBag(cfg).full_weight()
    bound = math.sqrt(1 / 8000)
    assert abs(float(rows.mean())) < 0.05 * bound
    assert float(rows.var()) == pytest.approx((2 * bound) ** 2 / 12, rel=0.2)


@pytest.mark.parametrize("data_type", ["FP16", "BF16"])
def test_low_precision_cores_compute_in_fp32(data_type: str) -> None:
    """FP16/BF16 tables: cores stored in that dtype (half the bytes), lookups in fp32 equal to
    F.embedding_bag over the upcast cores' rows, gradients back on the low-precision cores."""
    import torch.nn.functional as F
    from torchrec import KeyedJaggedTensor
    from torchrec.modules.embedding_configs import DataType

    from torchrec_tt import TTEmbeddingBagCollection

    torch.manual_seed(0)
    kw = dict(num_embeddings=500, embedding_dim=8, feature_names=["f"], tt_ranks=[4, 4])
    low = TTEmbeddingBagConfig(name="t", data_type=DataType[data_type], **kw)
    full = TTEmbeddingBagConfig(name="t", **kw)
    assert low.storage_bytes() * 2 == full.storage_bytes()
    ebc = TTEmbeddingBagCollection([low], is_weighted=True)
    dtype = torch.float16 if data_type == "FP16" else torch.bfloat16
    assert all(c.dtype == dtype for c in ebc.parameters())
    assert sum(c.numel() * c.element_size() for c in ebc.parameters()) == low.storage_bytes()
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 7, 499, 3, 3]), lengths=torch.tensor([2, 0, 3]),
                            weights=torch.tensor([0.5, 1.0, 2.0, -1.0, 1.0]))
    out = ebc(kjt).values()
    assert out.dtype == torch.float32
    rows = ebc.full_weight("t")
    assert rows.dtype == torch.float32
    want = F.embedding_bag(kjt.values(), rows, kjt.offsets()[:-1], mode="sum", per_sample_weights=kjt.weights())
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    out.sum().backward()
    assert all(c.grad is not None and c.grad.dtype == dtype and bool(c.grad.abs().sum() > 0) for c in ebc.parameters())


def test_low_precision_fused_optimizer_keeps_fp32_state_and_steps() -> None:
    """TTFusedOptimizer on BF16 cores: Adagrad state in fp32, update computed in fp32 and
    written back with stochastic rounding (unbiased); state survives a save/load."""
    from torchrec import KeyedJaggedTensor
    from torchrec.modules.embedding_configs import DataType

    from torchrec_tt import TTEmbeddingBagCollection, TTFusedOptimizer

    torch.manual_seed(0)
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=500, embedding_dim=8, feature_names=["f"], tt_ranks=[4, 4],
                               data_type=DataType.BF16)
    ebc = TTEmbeddingBagCollection([cfg])
    opt = TTFusedOptimizer(dict(ebc.named_parameters()), torch.optim.Adagrad, {"lr": 0.01})
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 7, 499, 3, 3]), lengths=torch.tensor([2, 0, 3]))
    before = [p.detach().float().clone() for p in ebc.parameters()]
    ebc(kjt).values().sum().backward()  # the cores step at the end of the backward
    # reference: one fp32 Adagrad step from the same start, same gradients
    ref = [b.clone().requires_grad_(True) for b in before]
    from torchrec_tt import tt_embedding_bag
    tt_embedding_bag(ref, kjt.values(), kjt.offsets()).sum().backward()
    torch.optim.Adagrad(ref, lr=0.01).step()
    for p, r in zip(ebc.parameters(), ref):
        assert p.dtype == torch.bfloat16
        # stochastic rounding: within one bf16 ulp of the fp32 result
        assert float(((p.float() - r.detach()).abs() / r.detach().abs().clamp_min(1e-30)).max()) <= 2 ** -7
    state = opt.state_dict()
    assert all(s["sum"].dtype == torch.float32 for s in state["state"].values())
    other = TTEmbeddingBagCollection([cfg])
    opt2 = TTFusedOptimizer(dict(other.named_parameters()), torch.optim.Adagrad, {"lr": 0.01})
    opt2.load_state_dict(state)
    for a, b in zip(state["state"].values(), opt2.state_dict()["state"].values()):
        assert b["sum"].dtype == torch.float32 and torch.equal(a["sum"], b["sum"])


def test_bf16_stochastic_rounding_is_unbiased() -> None:
    from torchrec_tt.distributed.optimizer import _round_to

    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # between two bf16 values (1 and 1 + 2^-7)
    y = _round_to(x, torch.bfloat16).float()
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert float(y.mean()) == pytest.approx(1.0 + 2 ** -10, abs=2e-5)
