"""Faults: a failed step changes nothing (unsharded here; 2 gloo ranks in test_tt_sharding.py).

TT fused optimizers step the cores only when the whole backward succeeded. A backward that
raises (in the loss, in a hook on any core) or a batch that is rejected leaves every core and
every optimizer state ``torch.equal`` to before, and the next good step is the one a model
that never saw the failure takes.
"""

import copy
import re
from typing import Any, Dict, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.distributed import TTFusedOptimizer
from torchrec_tt.distributed.optimizer import resolve_optimizer

# Every optimizer the TT kernel offers, as the sharder's fused_params name them.
FUSED_PARAMS = {
    "sgd": {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1},
    "adagrad": {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1},
    "adam": {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01},
}


class FailInBackward(torch.autograd.Function):
    """Identity whose backward raises: a loss term that fails after the lookups' backward ran."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("loss backward failed")


def raising_hook(name: str):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"hook on {name} failed")

    return hook


def _two_tables() -> TTEmbeddingBagCollection:
    torch.manual_seed(0)
    return TTEmbeddingBagCollection(
        [
            TTEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"],
                                 tt_p_shapes=[10, 10], tt_q_shapes=[2, 4], tt_ranks=[3]),
            TTEmbeddingBagConfig(name="u", num_embeddings=120, embedding_dim=8, feature_names=["g"],
                                 tt_p_shapes=[4, 5, 6], tt_q_shapes=[2, 2, 2], tt_ranks=[2, 3]),
        ]
    )


def _loss(module: TTEmbeddingBagCollection, seed: int, fail_in_loss: bool = False, bad_id: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Created before the lookups, so its backward runs after theirs (the engine runs later nodes first).
    extra = torch.ones(1, requires_grad=True)
    late_term = FailInBackward.apply(extra) if fail_in_loss else extra
    values = torch.cat([torch.randint(0, 100, (12,), generator=g), torch.randint(0, 120, (9,), generator=g)])
    if bad_id:
        values[-1] = 120  # table u has 120 rows
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=values, lengths=torch.tensor([5, 0, 7, 3, 3, 3]))
    return (module(kjt).values() * torch.randn(3, 16, generator=g)).sum() + late_term.sum()


def snapshot(params: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Copies of the parameters and of a ``state_dict()["state"]``."""
    return {k: v.detach().clone() for k, v in params.items()}, copy.deepcopy(optimizer_state)


def assert_same(a: Tuple[Dict[str, torch.Tensor], Dict[str, Any]], b: Tuple[Dict[str, torch.Tensor], Dict[str, Any]], what: str) -> None:
    params_a, state_a = a
    params_b, state_b = b
    assert params_a.keys() == params_b.keys(), what
    for key in params_a:
        assert torch.equal(params_a[key], params_b[key]), f"{what}: parameter {key} changed"
    assert state_a.keys() == state_b.keys(), f"{what}: {list(state_a)} vs {list(state_b)}"
    for key in state_a:
        assert state_a[key].keys() == state_b[key].keys(), f"{what}: state of {key}"
        for name, value in state_a[key].items():
            other = state_b[key][name]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"{what}: optimizer state {key}/{name} changed"


def _state(module, optimizer):
    return snapshot(dict(module.named_parameters()), optimizer.state_dict()["state"])


@pytest.mark.parametrize("name", list(FUSED_PARAMS))
def test_failed_backward_or_batch_steps_nothing(name: str) -> None:
    spec = resolve_optimizer(FUSED_PARAMS[name])
    module, twin = _two_tables(), _two_tables()
    optimizer = TTFusedOptimizer(dict(module.named_parameters()), *spec)
    twin_optimizer = TTFusedOptimizer(dict(twin.named_parameters()), *spec)
    _loss(module, 0).backward()  # optimizer state exists (and must not move either)
    _loss(twin, 0).backward()
    before = _state(module, optimizer)
    assert before[1], "the first step created optimizer state"

    with pytest.raises(RuntimeError, match="loss backward failed"):
        _loss(module, 1, fail_in_loss=True).backward()
    assert_same(_state(module, optimizer), before, f"{name}, failure in the loss")

    for core_name, core in module.named_parameters():  # a failing hook on any core
        handle = core.register_hook(raising_hook(core_name))
        with pytest.raises(RuntimeError, match=f"hook on {re.escape(core_name)} failed"):
            _loss(module, 1).backward()
        handle.remove()
        assert_same(_state(module, optimizer), before, f"{name}, hook on {core_name}")

    with pytest.raises(ValueError, match=r"table 'u'.*feature 'g'.*120"):
        _loss(module, 1, bad_id=True).backward()
    assert_same(_state(module, optimizer), before, f"{name}, bad batch")

    # No gradient of a failed backward survives into the next step.
    _loss(module, 1).backward()
    _loss(twin, 1).backward()
    after = _state(module, optimizer)
    assert_same(after, _state(twin, twin_optimizer), f"{name}, the step after the failures")
    assert not torch.equal(after[0]["embedding_bags.u.cores.2"], before[0]["embedding_bags.u.cores.2"])


def test_a_backward_without_tt_cores_steps_nothing_later() -> None:
    """Stashed gradients belong to their backward: an unrelated backward does not apply them."""
    module = _two_tables()
    optimizer = TTFusedOptimizer(dict(module.named_parameters()), torch.optim.SGD, {"lr": 0.1})
    before = _state(module, optimizer)
    with pytest.raises(RuntimeError, match="loss backward failed"):
        _loss(module, 1, fail_in_loss=True).backward()
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    assert_same(_state(module, optimizer), before, "unrelated backward")


def test_load_rejects_state_of_the_wrong_shape() -> None:
    module = _two_tables()
    optimizer = TTFusedOptimizer(dict(module.named_parameters()), torch.optim.Adam, {"lr": 0.01})
    _loss(module, 0).backward()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"]["embedding_bags.u.cores.1"]["exp_avg_sq"] = torch.zeros(5, 2, 2)

    fresh_module = _two_tables()
    fresh = TTFusedOptimizer(dict(fresh_module.named_parameters()), torch.optim.Adam, {"lr": 0.01})
    _loss(fresh_module, 0).backward()
    before = _state(fresh_module, fresh)
    with pytest.raises(ValueError) as error:
        fresh.load_state_dict(saved)
    assert str(error.value) == (
        "table 'u', parameter 'embedding_bags.u.cores.1': optimizer state 'exp_avg_sq' has shape (5, 2, 2), "
        "expected (5, 2, 2, 3)"
    )
    assert_same(_state(fresh_module, fresh), before, "a rejected load loads nothing")
