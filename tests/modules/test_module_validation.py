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
