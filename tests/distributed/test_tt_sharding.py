"""Sharded TT tables on 2 CPU ranks (gloo) against the unsharded module.

Every rank builds the same unsharded reference (same seed) and every rank's batch, so
the reference runs on the global batch: the sharded output of rank ``r`` must match the
reference rows of rank ``r``, and the sharded gradients the gradients of the mean over
ranks of the per-rank losses (TorchRec divides pooled-embedding gradients by the world
size, DDP averages dense gradients).
"""

import copy
import os
import tempfile
import time
import unittest

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import KeyedJaggedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import Topology
from torchrec.optim import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tt_dist_testing import (
    FailFastMultiProcessTestBase,
    ATOL,
    BATCH_SIZE,
    SparseArch,
    concat_kjts,
    copy_regular_tables,
    ebc_tables,
    interleaved_plan,
    local_regular_weight,
    loss_weights,
    rank_batches,
    rank_context,
    reference_loss,
    shard,
    train_step,
    tt_params,
    tt_tables,
)
from torchrec_tt.distributed import (
    TTEmbeddingBagCollectionSharder,
    load_tt_optimizer_state_dict,
    make_tt_planner,
    tt_optimizer_state_dict,
)

EBC_LR = 0.5  # exact SGD on the regular table: its update reveals its gradient


def _check_forward_backward(
    ctx, variant: str, weighted: bool, use_planner: bool, seed: int, regular: bool = True, tt_ranks=None
) -> None:
    """Sharded forward and backward against the reference; ``regular`` adds an FBGEMM table."""
    torch.manual_seed(seed)
    ref = SparseArch(tt_tables(variant), ebc_tables() if regular else None, is_weighted=weighted)
    sharders = [
        TTEmbeddingBagCollectionSharder(),
        EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": EBC_LR}),
    ]
    if use_planner:  # one planner call plans the TT and the regular tables
        topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type)
        plan = make_tt_planner(topology, batch_size=BATCH_SIZE).collective_plan(ref, sharders, ctx.pg)
        assert set(plan.plan) == ({"tt", "ebc"} if regular else {"tt"}), plan
    else:
        plan = interleaved_plan(ref, ctx.world_size, *sharders, device_type=ctx.device.type, tt_ranks=tt_ranks)
    dmp = shard(copy.deepcopy(ref), ctx.pg, plan, sharders, ctx.device)
    copy_regular_tables(dmp, ref)
    ref = ref.to(ctx.device)
    regular_key = "ebc.embedding_bags.e0.weight"
    before = local_regular_weight(dmp, regular_key) if regular else None

    batches = [b.to(ctx.device) for b in rank_batches(ref, ctx.world_size, seed, weighted)]
    weights = [w.to(ctx.device) for w in loss_weights(ctx.world_size, 16 * 2 + 8 + 12 + 8 * regular, seed)]
    local = batches[ctx.rank]
    out = dmp(local)
    ref_out = ref(concat_kjts(batches))
    rows = slice(ctx.rank * BATCH_SIZE, (ctx.rank + 1) * BATCH_SIZE)
    torch.testing.assert_close(out, ref_out[rows], atol=ATOL, rtol=0)
    keys = dmp.module.tt(local).wait().keys()
    assert keys == ref.tt(local).keys(), (keys, ref.tt(local).keys())

    (out * weights[ctx.rank]).sum().backward()
    reference_loss(ref_out, weights).backward()
    expected = tt_params(ref)
    for name, param in tt_params(dmp).items():  # the cores this rank owns
        torch.testing.assert_close(param.grad, expected[name].grad, atol=ATOL, rtol=0, msg=name)
    if before is not None:
        after = local_regular_weight(dmp, regular_key)
        grad = (before[0] - after[0]) / EBC_LR
        torch.testing.assert_close(grad, ref.ebc.embedding_bags["e0"].weight.grad, atol=ATOL, rtol=0)
    elif regular:
        local_regular_weight(dmp, regular_key)  # state_dict() is a collective: every rank calls it


def _forward_backward_worker(rank: int, world_size: int) -> None:
    with rank_context(rank, world_size) as ctx:
        _check_forward_backward(ctx, "grt", weighted=False, use_planner=False, seed=1)
        _check_forward_backward(ctx, "tt", weighted=False, use_planner=False, seed=2)
        _check_forward_backward(ctx, "grt", weighted=True, use_planner=True, seed=3)
        _check_forward_backward(ctx, "tt", weighted=True, use_planner=True, seed=4)
        # Rank 0 holds no TT table.
        _check_forward_backward(ctx, "grt", False, False, seed=5, tt_ranks={"t0": 1, "t1": 1, "t2": 1})


def _nccl_forward_backward_worker(rank: int, world_size: int) -> None:
    # TT tables only: the GPU test machine has no CUDA FBGEMM kernels for regular tables.
    # TorchRec's deterministic mode would reject CUDA ops without deterministic kernels.
    with rank_context(rank, world_size, "nccl", use_deterministic_algorithms=False) as ctx:
        assert ctx.device.type == "cuda", ctx.device
        for seed, (variant, weighted, use_planner) in enumerate(
            [("grt", False, False), ("tt", False, False), ("grt", True, True), ("tt", True, True)]
        ):
            _check_forward_backward(ctx, variant, weighted, use_planner, seed, regular=False)


# ---------------------------------------------------------------------------- training
def _optimizer_cases():
    """(name, sharder fused_params, in-backward optimizer on the unsharded cores, torch reference)."""
    return [
        ("sgd", {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.2}, None, (torch.optim.SGD, {"lr": 0.2})),
        (
            "adagrad",
            {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8},
            None,
            (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}),
        ),
        ("adam", {}, (torch.optim.Adam, {"lr": 0.01}), (torch.optim.Adam, {"lr": 0.01})),
    ]


def _training_worker(rank: int, world_size: int) -> None:
    with rank_context(rank, world_size) as ctx:
        for case, (name, fused_params, in_backward, (ref_class, ref_kwargs)) in enumerate(_optimizer_cases()):
            torch.manual_seed(case)
            ref = SparseArch(tt_tables("grt"), is_weighted=False, dense=True)
            model = copy.deepcopy(ref)
            if in_backward is not None:
                apply_optimizer_in_backward(in_backward[0], model.tt.parameters(), in_backward[1])
            sharders = [TTEmbeddingBagCollectionSharder(fused_params=fused_params)]
            dmp = shard(model, ctx.pg, interleaved_plan(model, world_size, *sharders), sharders, ctx.device)
            # An unchanged TorchRec training loop: fused (in-backward) optimizer + dense optimizer.
            dense = KeyedOptimizerWrapper(
                dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=0.05)
            )
            assert not any(".cores." in k for k in dense.params), list(dense.params)
            optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
            assert any(".cores." in k for k in dmp.fused_optimizer.params), name

            ref_optimizers = [
                ref_class([p for n, p in ref.named_parameters() if ".cores." in n], **ref_kwargs),
                torch.optim.SGD(ref.dense.parameters(), lr=0.05),
            ]
            for step in range(2):
                batches = rank_batches(ref, world_size, seed=50 + step)
                weights = loss_weights(world_size, 3, seed=50 + step)
                (dmp(batches[rank]) * weights[rank]).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
                reference_loss(ref(concat_kjts(batches)), weights).backward()
                for o in ref_optimizers:
                    o.step()
                    o.zero_grad()
                expected = dict(ref.named_parameters())
                for key, param in dmp.named_parameters():
                    torch.testing.assert_close(param, expected[key], atol=ATOL, rtol=0, msg=f"{name} step {step}: {key}")


# ---------------------------------------------------------------------------- checkpoints
CKPT_OPTIMIZER = (torch.optim.Adam, {"lr": 0.01})


def _tt_model(seed: int) -> SparseArch:
    torch.manual_seed(seed)
    model = SparseArch(tt_tables("grt"))
    apply_optimizer_in_backward(CKPT_OPTIMIZER[0], model.tt.parameters(), CKPT_OPTIMIZER[1])
    return model


def _save_worker(rank: int, world_size: int, path: str) -> None:
    """World size 2: train, checkpoint, then record the next step's outputs and weights."""
    with rank_context(rank, world_size) as ctx:
        model = _tt_model(seed=7)
        sharders = [TTEmbeddingBagCollectionSharder()]
        dmp = shard(model, ctx.pg, interleaved_plan(model, world_size), sharders, ctx.device)
        for step in range(2):
            batches = rank_batches(model, world_size, seed=70 + step)
            train_step(dmp, batches[rank], loss_weights(world_size, 52, seed=70 + step)[rank])
        # state_dict() shares the local cores' storage, like nn.Module's: copy before training on.
        model_state = {k: v.clone() for k, v in dmp.state_dict().items()}
        checkpoint = {"model": model_state, "optimizer": tt_optimizer_state_dict(dmp)}
        assert len(checkpoint["model"]) == 9 and len(checkpoint["optimizer"]) == 9, list(checkpoint["model"])
        batches = rank_batches(model, world_size, seed=99)
        out = train_step(dmp, batches[rank], loss_weights(world_size, 52, seed=99)[rank])
        outputs = [torch.empty_like(out) for _ in range(world_size)]
        torch.distributed.all_gather(outputs, out, group=ctx.pg)
        after = dmp.state_dict()
        if rank == 0:
            torch.save({**checkpoint, "next_output": torch.cat(outputs), "next_model": after}, path)


def _load_worker(rank: int, world_size: int, path: str) -> None:
    """World size 1, fresh weights: load the 2-rank checkpoint, take the same next step."""
    with rank_context(rank, world_size) as ctx:
        saved = torch.load(path, weights_only=False)
        batches = rank_batches(_tt_model(seed=0), 2, seed=99)
        weights = loss_weights(2, 52, seed=99)
        global_batch = concat_kjts(batches)

        model = _tt_model(seed=123)
        sharders = [TTEmbeddingBagCollectionSharder()]
        dmp = shard(model, ctx.pg, interleaved_plan(model, world_size), sharders, ctx.device)
        dmp.load_state_dict(saved["model"])
        load_tt_optimizer_state_dict(dmp, saved["optimizer"])
        out = dmp(global_batch)
        assert torch.equal(out, saved["next_output"]), (out - saved["next_output"]).abs().max()
        reference_loss(out, weights).backward()  # what the 2-rank all-to-all's gradient division gave
        for key, value in dmp.state_dict().items():
            assert torch.equal(value, saved["next_model"][key]), key

        # The unsharded module + the same torch optimizer, through TorchRec's KeyedOptimizer.
        torch.manual_seed(5)
        plain = SparseArch(tt_tables("grt"))
        plain.load_state_dict(saved["model"])
        optimizer = KeyedOptimizerWrapper(dict(plain.named_parameters()), lambda ps: CKPT_OPTIMIZER[0](ps, **CKPT_OPTIMIZER[1]))
        optimizer.init_state()
        optimizer.load_state_dict({"state": saved["optimizer"]})
        out = plain(global_batch)
        assert torch.equal(out, saved["next_output"]), (out - saved["next_output"]).abs().max()
        reference_loss(out, weights).backward()
        optimizer.step()
        for key, value in plain.state_dict().items():
            assert torch.equal(value, saved["next_model"][key]), key


# ---------------------------------------------------------------------------- errors
def _errors_worker(rank: int, world_size: int) -> None:
    with rank_context(rank, world_size) as ctx:
        torch.manual_seed(0)
        model = SparseArch(tt_tables("grt"))
        sharders = [TTEmbeddingBagCollectionSharder()]
        plan = interleaved_plan(model, world_size)
        plan.plan["tt"]["t1"].compute_kernel = "dense"
        try:
            shard(copy.deepcopy(model), ctx.pg, plan, sharders, ctx.device)
            raise AssertionError("a dense plan for a TT table was accepted")
        except ValueError as e:
            assert "table 't1'" in str(e) and "customized_kernel" in str(e), e

        dmp = shard(model, ctx.pg, interleaved_plan(model, world_size), sharders, ctx.device)
        batch = rank_batches(model, world_size, seed=0)[0]
        try:
            dmp(KeyedJaggedTensor(keys=["f0"], values=batch["f0"].values(), lengths=batch["f0"].lengths()))
            raise AssertionError("a batch without f1, f2, f3 was accepted")
        except ValueError as e:
            assert "['f1', 'f2', 'f3']" in str(e), e

        state = dmp.state_dict()
        try:
            dmp.load_state_dict({**state, "tt.embedding_bags.t0.cores.0": torch.zeros(3)})
            raise AssertionError("a core of the wrong shape was accepted")
        except ValueError as e:
            assert "embedding_bags.t0.cores.0" in str(e) and "(10, 1, 2, 4)" in str(e), e
        incomplete = {k: v for k, v in state.items() if not k.endswith("t2.cores.3")}
        try:
            dmp.load_state_dict(incomplete)
            raise AssertionError("a state dict without t2.cores.3 was accepted under strict=True")
        except RuntimeError as e:
            assert "embedding_bags.t2.cores.3" in str(e), e
        # DistributedModelParallel reports a sharded module's keys relative to the module.
        assert dmp.load_state_dict(incomplete, strict=False).missing_keys == ["embedding_bags.t2.cores.3"]

        # Optimizer state of the wrong shape: refused when loaded, naming table, key and shapes.
        adam = _tt_model(seed=0)
        dmp = shard(adam, ctx.pg, interleaved_plan(adam, world_size), sharders, ctx.device)
        train_step(dmp, rank_batches(adam, world_size, seed=1)[0], loss_weights(world_size, 52, seed=1)[0])
        saved = tt_optimizer_state_dict(dmp)
        saved["tt.embedding_bags.t1.cores.0"]["exp_avg"] = torch.zeros(9, 1, 2)
        try:
            load_tt_optimizer_state_dict(dmp, saved)
            raise AssertionError("optimizer state of the wrong shape was accepted")
        except ValueError as e:
            assert str(e) == (
                "table 't1', parameter 'embedding_bags.t1.cores.0': optimizer state 'exp_avg' has shape (9, 1, 2), "
                "expected (9, 1, 2, 3)"
            ), e


class TTShardingTest(FailFastMultiProcessTestBase):
    def _timed(self, label: str, **kwargs) -> None:
        start = time.perf_counter()
        self._run_multi_process_test(**kwargs)
        print(f"{label}: {time.perf_counter() - start:.2f}s")

    def test_forward_backward_match_unsharded(self) -> None:
        self._timed("forward/backward", callable=_forward_backward_worker, world_size=2)

    def test_training_step_matches_torch_optimizers(self) -> None:
        self._timed("training", callable=_training_worker, world_size=2)

    def test_invalid_plans_inputs_and_checkpoints_raise(self) -> None:
        self._timed("errors", callable=_errors_worker, world_size=1)

    @unittest.skipIf(not torch.cuda.is_available(), "CUDA is not available on this machine")
    def test_forward_backward_match_unsharded_nccl(self) -> None:
        self._timed("nccl forward/backward", callable=_nccl_forward_backward_worker, world_size=1)

    def test_checkpoint_round_trip_across_world_sizes(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            self._timed("save (2 ranks)", callable=_save_worker, world_size=2, path=path)
            self._timed("load (1 rank)", callable=_load_worker, world_size=1, path=path)


if __name__ == "__main__":
    unittest.main()
