"""In-backward optimizers of TT cores (single process)."""

import copy

import pytest
import torch
import torchrec.optim as trec_optim
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import KeyedJaggedTensor
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.distributed import TTFusedOptimizer
from torchrec_tt.distributed.optimizer import optimizer_fused_params, resolve_optimizer


@pytest.mark.parametrize(
    "fused_params, expected",
    [
        ({"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.2}, (torch.optim.SGD, {"lr": 0.2})),
        ({"optimizer": EmbOptimType.SGD, "learning_rate": 0.2, "eps": 1.0}, (torch.optim.SGD, {"lr": 0.2})),
        (
            {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8, "weight_decay": 0.01},
            (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8, "weight_decay": 0.01}),
        ),
        (
            {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01, "beta1": 0.8, "beta2": 0.9, "eps": 1e-6},
            (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6}),
        ),
        ({"optimizer": "adam"}, (torch.optim.Adam, {"lr": 0.01})),
        ({"optimizer": trec_optim.Adagrad, "learning_rate": 0.3}, (torch.optim.Adagrad, {"lr": 0.3})),
        (
            optimizer_fused_params(torch.optim.AdamW, {"lr": 0.5, "betas": [0.7, 0.8]}),
            (torch.optim.AdamW, {"lr": 0.5, "betas": (0.7, 0.8)}),
        ),
        ({"learning_rate": 0.1}, None),
    ],
    ids=["exact_sgd", "sgd", "exact_adagrad", "adam", "adam_str", "torchrec_placeholder", "torch_class", "none"],
)
def test_resolve_optimizer(fused_params, expected) -> None:
    assert resolve_optimizer(fused_params) == expected


def test_optimizer_kwargs_dict_is_read_as_a_dict() -> None:
    """``{"lr": 0.1}`` once became ``{"l": "r"}`` (the dict was read as pairs)."""
    fused_params = {"optimizer": torch.optim.Adam, "optimizer_kwargs": {"lr": 0.1, "betas": (0.8, 0.9)}}
    assert resolve_optimizer(fused_params) == (torch.optim.Adam, {"lr": 0.1, "betas": (0.8, 0.9)})
    assert resolve_optimizer({"optimizer": torch.optim.SGD, "optimizer_kwargs": (("lr", 0.3),)}) == (
        torch.optim.SGD,
        {"lr": 0.3},
    )
    with pytest.raises(ValueError) as error:
        resolve_optimizer({"optimizer": torch.optim.SGD, "optimizer_kwargs": ["lr"]}, "t0")
    assert str(error.value) == "table 't0': optimizer_kwargs must be a dict or (name, value) pairs, got ['lr']"


def test_resolve_optimizer_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="table 't0'.*exact_row_wise_adagrad.*not supported"):
        resolve_optimizer({"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD}, "t0")


def _module() -> TTEmbeddingBagCollection:
    torch.manual_seed(0)
    return TTEmbeddingBagCollection(
        [TTEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"],
                              tt_p_shapes=[10, 10], tt_q_shapes=[2, 4], tt_ranks=[3])]
    )


def _loss(module: TTEmbeddingBagCollection, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.randint(0, 100, (12,), generator=g), lengths=torch.tensor([5, 0, 7]))
    return (module(kjt).values() * torch.randn(3, 8, generator=g)).sum()


@pytest.mark.parametrize(
    "optimizer_class, kwargs",
    [(torch.optim.SGD, {"lr": 0.1}), (torch.optim.Adagrad, {"lr": 0.1}), (torch.optim.Adam, {"lr": 0.01})],
    ids=["sgd", "adagrad", "adam"],
)
def test_steps_in_backward_like_the_torch_optimizer(optimizer_class, kwargs) -> None:
    fused, plain = _module(), _module()
    optimizer = TTFusedOptimizer(dict(fused.named_parameters()), optimizer_class, kwargs)
    reference = optimizer_class(plain.parameters(), **kwargs)
    for step in range(3):
        _loss(fused, step).backward()
        assert all(p.grad is None for p in fused.parameters()), "gradients are consumed in backward"
        optimizer.step()  # a no-op after backward: training loops may keep calling it
        _loss(plain, step).backward()
        reference.step()
        reference.zero_grad()
        for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
            assert torch.equal(a, b), name
    assert not list(in_backward_optimizer_filter(fused.named_parameters()))
    assert set(optimizer.state_dict()["state"]) == {"embedding_bags.t.cores.0", "embedding_bags.t.cores.1"}


def test_state_dict_round_trip_into_fresh_and_initialized_optimizers() -> None:
    trained = _module()
    optimizer = TTFusedOptimizer(dict(trained.named_parameters()), torch.optim.Adam, {"lr": 0.01})
    _loss(trained, 0).backward()
    _loss(trained, 1).backward()
    saved = copy.deepcopy(optimizer.state_dict())

    # Fresh (lazy) optimizer: loaded directly.
    fresh = _module()
    fresh.load_state_dict(trained.state_dict())
    fresh_optimizer = TTFusedOptimizer(dict(fresh.named_parameters()), torch.optim.Adam, {"lr": 0.01})
    fresh_optimizer.load_state_dict(saved)
    # Through a CombinedOptimizer (as DistributedModelParallel.fused_optimizer): TorchRec's protocol.
    combined_module = _module()
    combined_module.load_state_dict(trained.state_dict())
    combined = CombinedOptimizer(
        [TTFusedOptimizer(dict(combined_module.named_parameters()), torch.optim.Adam, {"lr": 0.01})]
    )
    combined.init_state()
    combined.load_state_dict(saved)

    for module in (trained, fresh, combined_module):
        _loss(module, 2).backward()
    for a, b, c in zip(trained.parameters(), fresh.parameters(), combined_module.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(saved["state"]["embedding_bags.t.cores.0"]["step"], torch.tensor(2.0)), "checkpoint untouched"


def test_load_rejects_missing_parameters() -> None:
    optimizer = TTFusedOptimizer(dict(_module().named_parameters()), torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(ValueError, match="missing parameters.*cores.1"):
        optimizer.load_state_dict({"state": {"embedding_bags.t.cores.0": {}}})


@pytest.mark.parametrize(
    "optimizer_class, kwargs",
    [(torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}), (torch.optim.Adam, {"lr": 0.01}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})],
)
def test_deferred_steps_of_many_cores_match_one_by_one(optimizer_class, kwargs) -> None:
    """The deferred step combines cores with equal settings into one optimizer step: the same
    bits, parameters and state, as stepping each core's optimizer alone; a core with its own
    rate (kwargs override) and a core with a step hook still step on their own."""
    from torchrec_tt.distributed.optimizer import _STEPPERS, _step_pending

    shapes = [(5, 1, 2, 3), (5, 3, 2, 3), (4, 3, 2, 1), (6, 1, 4, 2)]
    names = [f"embedding_bags.t{i // 3}.cores.{i % 3}" for i in range(len(shapes))]
    torch.manual_seed(0)
    combined = {n: torch.nn.Parameter(torch.randn(s)) for n, s in zip(names, shapes)}
    alone = {n: torch.nn.Parameter(p.detach().clone()) for n, p in combined.items()}
    override = {names[3]: {"lr": 0.3}}
    a = TTFusedOptimizer(combined, optimizer_class, kwargs, override)
    b = TTFusedOptimizer(alone, optimizer_class, kwargs, override)
    hook_calls = []
    a._optimizers[names[2]].register_step_post_hook(lambda *args: hook_calls.append(1))
    for _ in range(3):
        grads = {n: torch.randn(s) for n, s in zip(names, shapes)}
        _step_pending([(a, n, p, grads[n]) for n, p in combined.items()])
        for n, p in alone.items():
            b._step_one(n, p, grads[n])
        assert all(p.grad is None for p in combined.values())
    assert len(hook_calls) == 3  # the hooked core stepped through its own optimizer
    assert any(cls is optimizer_class for cls, _ in _STEPPERS)  # the two plain cores stepped together
    for n in names:
        assert torch.equal(combined[n], alone[n]), n
    state_a, state_b = a.state_dict()["state"], b.state_dict()["state"]
    for n in names:
        for key, value in state_b[n].items():
            assert torch.equal(torch.as_tensor(state_a[n][key]), torch.as_tensor(value)), (n, key)
