"""Module-level input validation and "nothing is lost" on a failed training step.

With ``validate_inputs=True`` a bad batch raises ``ValueError`` naming the table, the
feature and the bad value; a failed step leaves cores and optimizer state exactly as
they were, so training can go on as if the bad batch had never been seen.
"""

import copy
import re

import pytest
import torch
from torchrec import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.modules import validate_lookups
from tt_testing import OP_ERRORS


def _tables():
    return [
        TTEmbeddingBagConfig(name="users", num_embeddings=50, embedding_dim=8, feature_names=["u_a", "u_b"], tt_ranks=[3, 3]),
        TTEmbeddingBagConfig(name="products", num_embeddings=30, embedding_dim=4, feature_names=["i_a"],
                             tt_p_shapes=[4, 8], tt_q_shapes=[2, 2], tt_ranks=[3], variant="tt"),
    ]


def _kjt(u_a=(1, 2, 3), u_b=(4, 5), i_a=(6, 7, 8, 9), lengths=(1, 2, 2, 0, 3, 1), weights=None):
    values = torch.tensor([*u_a, *u_b, *i_a])
    return KeyedJaggedTensor(
        keys=["u_a", "u_b", "i_a"], values=values, lengths=torch.tensor(lengths),
        weights=None if weights is None else weights,
    )


@pytest.mark.parametrize(
    "kwargs, table, feature, value",
    [
        (dict(i_a=(6, 30, 8, 9)), "products", "i_a", r"index 30\b"),  # == num_embeddings
        (dict(i_a=(6, 7, 31, 9)), "products", "i_a", r"index 31\b"),  # inside prod(p) = 32: padding row
        (dict(u_b=(4, -2)), "users", "u_b", r"index -2\b"),
        (dict(u_a=(1, 2, 777)), "users", "u_a", r"index 777\b"),
    ],
)
def test_bad_index_names_table_feature_and_value(kwargs, table, feature, value):
    module = TTEmbeddingBagCollection(_tables())
    with pytest.raises(ValueError) as excinfo:
        module(_kjt(**kwargs))
    message = str(excinfo.value)
    assert f"'{table}'" in message and f"'{feature}'" in message, message
    assert re.search(value, message), message


def test_float_ids_name_table_and_feature():
    module = TTEmbeddingBagCollection(_tables())
    kjt = KeyedJaggedTensor(keys=["u_a", "u_b", "i_a"], values=torch.arange(9.0), lengths=torch.tensor([1, 2, 2, 0, 3, 1]))
    with pytest.raises(ValueError, match=r"table 'users', feature 'u_a'.*int32 or int64.*float32"):
        module(kjt)


def test_negative_length_names_table_and_feature():
    module = TTEmbeddingBagCollection(_tables())
    kjt = _kjt(lengths=(1, 2, 3, -1, 3, 1))
    with pytest.raises(ValueError, match=r"table 'users', feature 'u_b'.*bag 1 has length -1"):
        module(kjt)


def test_integer_weights_rejected():
    module = TTEmbeddingBagCollection(_tables(), is_weighted=True)
    kjt = _kjt(weights=torch.arange(9))
    with pytest.raises(ValueError, match=r"table 'users', feature 'u_a'.*floating point.*int64"):
        module(kjt)


def test_validate_lookups_shapes():
    cfg = _tables()[0]
    with pytest.raises(ValueError, match=r"table 'users', feature 'x': lengths must sum to the number of ids \(3\), got 4"):
        validate_lookups(cfg, "x", torch.tensor([1, 2, 3]), torch.tensor([2, 2]), None)
    with pytest.raises(ValueError, match=r"table 'users', feature 'x': per-sample weights must have the ids' shape \(3,\), got \(2,\)"):
        validate_lookups(cfg, "x", torch.tensor([1, 2, 3]), torch.tensor([1, 2]), torch.ones(2))
    with pytest.raises(ValueError, match=r"table 'users', feature 'x'.*lengths.*float32"):
        validate_lookups(cfg, "x", torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]), None)


def _train_step(module, opt, kjt, target_seed=0):
    opt.zero_grad()
    out = module(kjt).values()
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(target_seed))
    loss = ((out - target) ** 2).sum()
    loss.backward()
    opt.step()


def _snapshot(module, opt):
    return copy.deepcopy(module.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"parameter {k} changed"
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for idx in oa["state"]:
        for name, value in oa["state"][idx].items():
            other = ob["state"][idx][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer state {idx}.{name} changed"


@pytest.mark.parametrize(
    "validate, bad_kjt, error",
    [
        (True, dict(i_a=(6, 7, 8, 30)), ValueError),  # the bad id is in the last table: earlier tables already ran
        (True, dict(u_a=(-1, 2, 3)), ValueError),
        (False, dict(i_a=(6, 7, 8, 99)), OP_ERRORS),  # op-level check (CPU) without module validation
        (False, dict(u_b=(4, -5)), OP_ERRORS),
    ],
    ids=["module_last_table", "module_first_table", "op_out_of_range", "op_negative"],
)
def test_failed_step_loses_nothing(validate, bad_kjt, error):
    torch.manual_seed(0)
    module = TTEmbeddingBagCollection(_tables(), validate_inputs=validate)
    twin = copy.deepcopy(module)
    opt = torch.optim.Adagrad(module.parameters(), lr=0.1)
    twin_opt = torch.optim.Adagrad(twin.parameters(), lr=0.1)

    _train_step(module, opt, _kjt(), target_seed=1)
    _train_step(twin, twin_opt, _kjt(), target_seed=1)
    before = _snapshot(module, opt)
    assert any(len(s) for s in before[1]["state"].values())  # Adagrad state exists after one step

    with pytest.raises(error):
        _train_step(module, opt, _kjt(**bad_kjt), target_seed=2)
    _assert_same(_snapshot(module, opt), before)
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in module.parameters())

    # Training continues exactly as if the bad batch had never been seen.
    _train_step(module, opt, _kjt(u_a=(3, 2, 1)), target_seed=3)
    _train_step(twin, twin_opt, _kjt(u_a=(3, 2, 1)), target_seed=3)
    _assert_same(_snapshot(module, opt), _snapshot(twin, twin_opt))


# ---------------------------------------------------------------------------------------
# Issue 10 (part A): KJT-level promises; module errors name the table AND the feature.
# ---------------------------------------------------------------------------------------


def _raises(module, kjt, pattern):
    with pytest.raises(ValueError) as excinfo:
        module(kjt)
    assert re.search(pattern, str(excinfo.value)), str(excinfo.value)


@pytest.mark.parametrize("bad, text", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_non_finite_kjt_weights_rejected(bad, text):
    module = TTEmbeddingBagCollection(_tables(), is_weighted=True)
    weights = torch.ones(9)
    weights[4] = bad  # u_b's second weight
    _raises(module, _kjt(weights=weights), rf"^table 'users', feature 'u_b': per-sample weights must be finite, got {text} at position 1$")


def test_float64_weight_overflowing_the_cores_dtype_rejected():
    module = TTEmbeddingBagCollection(_tables(), is_weighted=True)
    weights = torch.ones(9, dtype=torch.float64)
    weights[7] = 1e300  # finite in float64, inf once cast to the float32 cores
    _raises(module, _kjt(weights=weights), r"^table 'products', feature 'i_a': per-sample weights must be finite, got inf at position 2$")


def test_tt_embedding_bag_rejects_padding_rows():
    """products: num_embeddings 30 in prod(p) = 32 rows; ids 30 and 31 were silently accepted."""
    from torchrec_tt import TTEmbeddingBag

    bag = TTEmbeddingBag(_tables()[1])
    for bad in (30, 31, -1):
        with pytest.raises(ValueError, match=rf"^table 'products': indices\[1\] must be in \[0, num_embeddings=30\), got {bad}$"):
            bag(torch.tensor([0, bad, 2]), torch.tensor([0, 3]))
    weights = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"^table 'products': per_sample_weights\[1\] must be finite, got nan$"):
        bag(torch.tensor([0, 1, 2]), torch.tensor([0, 3]), weights)
    unchecked = TTEmbeddingBag(_tables()[1], validate_inputs=False)
    assert unchecked(torch.tensor([31]), torch.tensor([0, 1])).shape == (1, 4)  # the op's own bound is prod(p)


def test_lengths_summing_to_less_than_the_values_rejected():
    kjt = KeyedJaggedTensor(keys=["u_a", "u_b", "i_a"], values=torch.arange(10), lengths=torch.tensor([1, 2, 2, 0, 3, 1]))
    _raises(TTEmbeddingBagCollection(_tables()), kjt,
            r"^table 'products', feature 'i_a': KJT lengths must sum to the number of values \(10\), got 9$")


def test_lengths_summing_to_more_than_the_values_rejected():
    kjt = KeyedJaggedTensor(keys=["u_a", "u_b", "i_a"], values=torch.arange(4), lengths=torch.tensor([1, 2, 2, 0, 3, 1]))
    _raises(TTEmbeddingBagCollection(_tables()), kjt,
            r"^table 'users', feature 'u_b': KJT lengths through this feature must sum to at most the number of values \(4\), got 5$")


@pytest.mark.parametrize("num_weights, pattern", [
    (10, r"^table 'products', feature 'i_a': KJT lengths must sum to the number of weights \(10\), got 9$"),
    (6, r"^table 'products', feature 'i_a': KJT lengths through this feature must sum to at most the number of weights \(6\), got 9$"),
])
def test_weights_count_must_match_values(num_weights, pattern):
    kjt = _kjt(weights=torch.ones(num_weights))
    _raises(TTEmbeddingBagCollection(_tables(), is_weighted=True), kjt, pattern)


def test_duplicated_kjt_key_rejected():
    kjt = KeyedJaggedTensor(keys=["u_a", "u_b", "u_a"], values=torch.arange(6), lengths=torch.tensor([1, 1, 1, 1, 1, 1]))
    tables = [TTEmbeddingBagConfig(name="users", num_embeddings=50, embedding_dim=8, feature_names=["u_a", "u_b"], tt_ranks=[3, 3])]
    _raises(TTEmbeddingBagCollection(tables), kjt, r"^table 'users', feature 'u_a': KJT keys must be distinct, got 'u_a' at positions 0 and 2$")


def test_2d_values_blame_the_values():
    kjt = KeyedJaggedTensor(keys=["u_a", "u_b", "i_a"], values=torch.arange(18).reshape(9, 2), lengths=torch.tensor([1, 2, 2, 0, 3, 1]))
    _raises(TTEmbeddingBagCollection(_tables()), kjt, r"^table 'users', feature 'u_a': KJT values must be 1-D, got shape \(9, 2\)$")


def test_weighted_module_without_weights():
    _raises(TTEmbeddingBagCollection(_tables(), is_weighted=True), _kjt(),
            r"^table 'users', feature 'u_a': the module is weighted \(is_weighted=True\), but the KJT has no weights, got None$")


def test_missing_feature_names_table_and_feature():
    kjt = KeyedJaggedTensor(keys=["u_a", "i_a"], values=torch.arange(5), lengths=torch.tensor([1, 2, 2, 0]))
    _raises(TTEmbeddingBagCollection(_tables()), kjt, r"^table 'users', feature 'u_b': the input KJT must have every table's features")


def test_negative_length_is_named_before_the_sums():
    kjt = _kjt(lengths=(1, 2, 2, 0, -3, 7))
    _raises(TTEmbeddingBagCollection(_tables()), kjt, r"^table 'products', feature 'i_a': lengths must be >= 0, but bag 0 has length -3$")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_int32_ids_on_a_table_of_more_than_2_31_rows_accepted(index_dtype):
    table = TTEmbeddingBagConfig(name="huge", num_embeddings=2_500_000_000, embedding_dim=4, feature_names=["h"],
                                 tt_p_shapes=[50_000, 50_000], tt_q_shapes=[2, 2], tt_ranks=[2])
    module = TTEmbeddingBagCollection([table])
    ids = [2**31 - 1, 3, 1_234_567_890]
    kjt = KeyedJaggedTensor(keys=["h"], values=torch.tensor(ids, dtype=index_dtype), lengths=torch.tensor([1, 2], dtype=index_dtype))
    out = module(kjt).values()
    c0, c1 = list(module.embedding_bags["huge"].cores)
    rows = [(c0[i // 50_000, 0] @ c1[i % 50_000, :, :, 0]).reshape(-1) for i in ids]
    torch.testing.assert_close(out, torch.stack([rows[0], rows[1] + rows[2]]).detach())
    bad = KeyedJaggedTensor(keys=["h"], values=torch.tensor([1, -2], dtype=index_dtype), lengths=torch.tensor([1, 1], dtype=index_dtype))
    _raises(module, bad, r"^table 'huge', feature 'h': ids must be in \[0, 2500000000\), got index -2 at position 1$")


def test_meta_module_skips_value_reads():
    module = TTEmbeddingBagCollection(_tables(), is_weighted=True, device=torch.device("meta"))
    kjt = _kjt(weights=torch.ones(9)).to(torch.device("meta"))
    out = module(kjt)
    assert out.values().shape == (2, 8 + 8 + 4) and out.values().device.type == "meta"
