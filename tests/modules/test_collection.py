"""``TTEmbeddingBagCollection``: EmbeddingBagCollection semantics, checked against TorchRec.

The strongest check builds a torchrec ``EmbeddingBagCollection`` with the same tables,
sets every table's weight to ``full_weight()`` of the TT module and compares outputs.
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType

from torchrec_tt import TTEmbeddingBag, TTEmbeddingBagCollection, TTEmbeddingBagConfig, tt_to_dense
from tt_testing import DEVICES, embedding_bag_ref


def _tables(pooling=PoolingType.SUM, variants=("grt", "tt", "grt")):
    return [
        TTEmbeddingBagConfig(name="user", num_embeddings=50, embedding_dim=8, feature_names=["u_click", "u_view"],
                             tt_ranks=[3, 4], pooling=pooling, variant=variants[0]),
        TTEmbeddingBagConfig(name="item", num_embeddings=30, embedding_dim=6, feature_names=["i_id"],
                             tt_p_shapes=[5, 6], tt_q_shapes=[3, 2], tt_ranks=[4], pooling=pooling, variant=variants[1]),
        TTEmbeddingBagConfig(name="ctx", num_embeddings=100, embedding_dim=4, feature_names=["c_a", "c_b", "c_c"],
                             tt_p_shapes=[4, 5, 5], tt_q_shapes=[1, 2, 2], tt_ranks=[2, 3], pooling=pooling, variant=variants[2]),
    ]


def _features(tables):
    return [(f, t) for t in tables for f in t.feature_names]


def _random_kjt(tables, batch_size, gen, key_order=None, weighted=False, device="cpu", max_len=4):
    """A KJT over all features (in ``key_order``); returns it and its per-feature (ids, lengths, weights)."""
    feats = dict(_features(tables))
    keys = list(key_order or feats)
    lengths, values, per_feature = [], [], {}
    for f in keys:
        lens = torch.randint(0, max_len + 1, (batch_size,), generator=gen)
        ids = torch.randint(0, feats[f].num_embeddings, (int(lens.sum()),), generator=gen)
        per_feature[f] = [ids, lens, None]
        lengths.append(lens)
        values.append(ids)
    weights = None
    if weighted:
        ws = [torch.rand(v.numel(), generator=gen) + 0.25 for v in values]
        for f, w in zip(keys, ws):
            per_feature[f][2] = w
        weights = torch.cat(ws).to(device)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values).to(device), lengths=torch.cat(lengths).to(device), weights=weights
    )
    return kjt, per_feature


def _torchrec_twin(module: TTEmbeddingBagCollection, device="cpu") -> EmbeddingBagCollection:
    tables = module.embedding_bag_configs()
    ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim,
                            feature_names=list(t.feature_names), pooling=t.pooling) for t in tables],
        is_weighted=module.is_weighted(),
        device=torch.device(device),
    )
    with torch.no_grad():
        for t in tables:
            ebc.embedding_bags[t.name].weight.copy_(module.full_weight(t.name))
    return ebc


@pytest.mark.parametrize("device", DEVICES)
# torchrec's EmbeddingBagCollection takes per-sample weights only with sum pooling.
@pytest.mark.parametrize(
    "pooling, weighted",
    [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)],
    ids=["sum", "mean", "weighted_sum"],
)
@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), batch_size=st.integers(1, 5), shuffle=st.booleans())
def test_matches_torchrec_embedding_bag_collection(pooling, weighted, device, seed, batch_size, shuffle):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tables = _tables(pooling)
    module = TTEmbeddingBagCollection(tables, is_weighted=weighted, device=torch.device(device))
    keys = [f for f, _ in _features(tables)]
    if shuffle:  # the KJT's key order must not matter
        keys = [keys[i] for i in torch.randperm(len(keys), generator=gen).tolist()]
    kjt, _ = _random_kjt(tables, batch_size, gen, keys, weighted, device)
    out = module(kjt)
    ref = _torchrec_twin(module, device)(kjt)
    assert isinstance(out, KeyedTensor)
    assert out.keys() == ref.keys() == [f for f, _ in _features(tables)]
    assert out.length_per_key() == ref.length_per_key()
    assert out.values().shape == (batch_size, sum(t.embedding_dim * len(t.feature_names) for t in tables))
    torch.testing.assert_close(out.values(), ref.values(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_weighted_uses_kjt_weights_per_feature(pooling, device):
    """Each feature's pooled output is the reference bag over its own ids and KJT weights
    (weighted mean included, which torchrec's EBC does not support)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tables = _tables(pooling)
    module = TTEmbeddingBagCollection(tables, is_weighted=True, device=torch.device(device))
    kjt, per_feature = _random_kjt(tables, 4, gen, weighted=True, device=device)
    out = module(kjt).to_dict()
    for f, t in _features(tables):
        ids, lens, w = per_feature[f]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        cores = list(module.embedding_bags[t.name].cores)
        expected = embedding_bag_ref(cores, ids.to(device), offsets.to(device), w.to(device), pooling.value.lower())
        torch.testing.assert_close(out[f], expected, rtol=1e-4, atol=1e-5)
    # Unweighted module on the same KJT ignores the weights.
    plain = TTEmbeddingBagCollection(tables, is_weighted=False, device=torch.device(device))
    plain.load_state_dict(module.state_dict())
    unweighted = plain(kjt).to_dict()
    f, t = _features(tables)[0]
    ids, lens, _ = per_feature[f]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    expected = embedding_bag_ref(list(plain.embedding_bags[t.name].cores), ids.to(device), offsets.to(device), None, pooling.value.lower())
    torch.testing.assert_close(unweighted[f], expected, rtol=1e-4, atol=1e-5)


def test_gradients_match_torchrec():
    """Backward through the module equals backward through the dense twin, chained to the cores."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    tables = _tables(PoolingType.MEAN)
    module = TTEmbeddingBagCollection(tables)
    kjt, _ = _random_kjt(tables, 5, gen)
    grad = torch.randn(5, sum(t.embedding_dim * len(t.feature_names) for t in tables), generator=gen)
    (module(kjt).values() * grad).sum().backward()
    # Reference: the dense weights as functions of the cores, pooled by torchrec.
    twin = _torchrec_twin(module)
    ref_cores = {t.name: [c.detach().clone().requires_grad_(True) for c in module.embedding_bags[t.name].cores] for t in tables}
    for t in tables:
        del twin.embedding_bags[t.name].weight
        twin.embedding_bags[t.name].weight = tt_to_dense(ref_cores[t.name], t.num_embeddings)
    (twin(kjt).values() * grad).sum().backward()
    for t in tables:
        for k, (c, r) in enumerate(zip(module.embedding_bags[t.name].cores, ref_cores[t.name])):
            torch.testing.assert_close(c.grad, r.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{t.name}.cores.{k}: {m}")


def test_state_dict_keys_and_round_trip():
    torch.manual_seed(0)
    tables = _tables()
    module = TTEmbeddingBagCollection(tables)
    state = module.state_dict()
    expected_keys = [f"embedding_bags.{t.name}.cores.{k}" for t in tables for k in range(t.num_cores)]
    assert list(state) == expected_keys
    for t in tables:
        for k, shape in enumerate(t.core_shapes):
            assert state[f"embedding_bags.{t.name}.cores.{k}"].shape == shape
    torch.manual_seed(1)
    other = TTEmbeddingBagCollection(copy.deepcopy(tables))
    kjt, _ = _random_kjt(tables, 3, torch.Generator().manual_seed(0))
    assert not torch.allclose(other(kjt).values(), module(kjt).values())
    other.load_state_dict(state)
    assert torch.equal(other(kjt).values(), module(kjt).values())
    for t in tables:
        assert torch.equal(other.full_weight(t.name), module.full_weight(t.name))


def test_full_weight_shape_with_padding_rows():
    tables = _tables()
    module = TTEmbeddingBagCollection(tables)
    for t in tables:
        w = module.full_weight(t.name)
        assert w.shape == (t.num_embeddings, t.embedding_dim)
        assert not w.requires_grad
    assert math.prod(tables[0].tt_p_shapes) > tables[0].num_embeddings  # padding exists
    with pytest.raises(ValueError, match=r"unknown table 'nope'"):
        module.full_weight("nope")


def test_meta_device_construction():
    tables = _tables()
    module = TTEmbeddingBagCollection(tables, device=torch.device("meta"))
    params = dict(module.named_parameters())
    assert len(params) == sum(t.num_cores for t in tables)
    for t in tables:
        for k, shape in enumerate(t.core_shapes):
            p = params[f"embedding_bags.{t.name}.cores.{k}"]
            assert p.device.type == "meta" and p.shape == shape and p.dtype == torch.float32
    module.reset_parameters()  # returns early on meta
    # Materialize, then initialize.
    module.to_empty(device="cpu")
    torch.manual_seed(0)
    module.reset_parameters()
    for t in tables:
        w = module.full_weight(t.name)
        assert torch.isfinite(w).all() and float(w.std()) > 0


def test_duplicate_table_names_rejected():
    a = TTEmbeddingBagConfig(name="dup", num_embeddings=10, embedding_dim=4, feature_names=["f0"])
    b = TTEmbeddingBagConfig(name="dup", num_embeddings=20, embedding_dim=4, feature_names=["f1"])
    with pytest.raises(ValueError, match=r"'dup'"):
        TTEmbeddingBagCollection([a, b])


def test_feature_in_two_tables_rejected():
    a = TTEmbeddingBagConfig(name="a", num_embeddings=10, embedding_dim=4, feature_names=["shared"])
    b = TTEmbeddingBagConfig(name="b", num_embeddings=20, embedding_dim=4, feature_names=["shared"])
    with pytest.raises(ValueError, match=r"'shared'"):
        TTEmbeddingBagCollection([a, b])


def test_plain_torchrec_config_rejected():
    plain = EmbeddingBagConfig(name="plain", num_embeddings=10, embedding_dim=4, feature_names=["f"])
    with pytest.raises(ValueError, match=r"'plain'.*TTEmbeddingBagConfig"):
        TTEmbeddingBagCollection([plain])


def test_missing_feature_rejected():
    tables = _tables()
    module = TTEmbeddingBagCollection(tables)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["u_click"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"u_view"):
        module(kjt)


def test_interface_and_single_bag():
    tables = _tables()
    module = TTEmbeddingBagCollection(tables, is_weighted=True)
    assert module.embedding_bag_configs() == tables and module.is_weighted()
    report = module.storage_report()
    assert set(report) == {t.name for t in tables}
    for t in tables:
        core_elements = sum(math.prod(s) for s in t.core_shapes)
        assert report[t.name]["tt_bytes"] == 4 * core_elements
        assert sum(p.numel() for p in module.embedding_bags[t.name].parameters()) == core_elements
    # TTEmbeddingBag alone behaves like nn.EmbeddingBag on the materialized table.
    bag = TTEmbeddingBag(tables[1])
    indices, offsets = torch.tensor([3, 29, 0, 7]), torch.tensor([0, 1, 1, 4])
    expected = torch.nn.functional.embedding_bag(indices, bag.full_weight(), offsets, mode="sum", include_last_offset=True)
    torch.testing.assert_close(bag(indices, offsets), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["items", "a.b", "keys"])
def test_table_names_that_cannot_be_module_keys_rejected(name):
    cfg = TTEmbeddingBagConfig(name=name, num_embeddings=10, embedding_dim=4, feature_names=["f"])
    with pytest.raises(ValueError, match=rf"{name!r}".replace(".", r"\.")):
        TTEmbeddingBagCollection([cfg])


@pytest.mark.parametrize("values_dtype, lengths_dtype", [(torch.int32, torch.int32), (torch.int32, torch.int64), (torch.int64, torch.int32)])
def test_kjt_index_dtypes(values_dtype, lengths_dtype):
    torch.manual_seed(0)
    tables = _tables(PoolingType.MEAN)
    module = TTEmbeddingBagCollection(tables)
    kjt, _ = _random_kjt(tables, 4, torch.Generator().manual_seed(3))
    expected = module(kjt).values()
    cast = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=kjt.values().to(values_dtype), lengths=kjt.lengths().to(lengths_dtype)
    )
    torch.testing.assert_close(module(cast).values(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(expected, _torchrec_twin(module)(kjt).values(), rtol=1e-4, atol=1e-5)
