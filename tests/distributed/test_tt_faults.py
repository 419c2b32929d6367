"""Faults: a failed step changes nothing (unsharded and on 2 gloo ranks); bad ids are reported
by the rank that sends them; a bad id on one rank ends a torchrun job promptly.

TT fused optimizers step the cores only when the whole backward succeeded. A backward that
raises (in the loss, in a hook on any core) or a batch that is rejected leaves every core and
every optimizer state ``torch.equal`` to before, and the next good step is the one a model
that never saw the failure takes.
"""

import copy
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import KeyedJaggedTensor
from torchrec.optim import apply_optimizer_in_backward

from torchrun_bad_id import with_bad_id
from tt_dist_testing import FailFastMultiProcessTestBase, SparseArch, interleaved_plan, loss_weights, rank_batches, rank_context, shard, tt_params, tt_tables
from tt_testing import checkout_env
from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt import modules as tt_modules
from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder, TTFusedOptimizer
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


def test_state_of_the_wrong_shape_found_before_any_core_steps() -> None:
    """State that bypassed the load check (set in place) fails the step before any core moves."""
    module = _two_tables()
    optimizer = TTFusedOptimizer(dict(module.named_parameters()), torch.optim.Adagrad, {"lr": 0.1})
    _loss(module, 0).backward()
    core = module.embedding_bags["u"].cores[2]
    optimizer._optimizers["embedding_bags.u.cores.2"].state[core]["sum"] = torch.zeros(6, 3)
    before = _state(module, optimizer)
    with pytest.raises(ValueError) as error:
        _loss(module, 1).backward()
    assert str(error.value) == (
        "table 'u', parameter 'embedding_bags.u.cores.2': optimizer state 'sum' has shape (6, 3), expected (6, 3, 2, 1)"
    )
    assert_same(_state(module, optimizer), before, "a refused step")


# ---------------------------------------------------------------------------- torchrun: a bad id on one rank
TORCHRUN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_bad_id.py")


def test_bad_id_on_one_rank_ends_the_torchrun_job_promptly(tmp_path) -> None:
    """Rank 1 alone feeds id 85 to table t1 (85 rows, owned by rank 0) while rank 0 waits in
    the input all-to-all: the job fails well within 60 s (no collective timeout), and the
    sender's (rank 1's) log holds the ValueError naming the table, the feature and the value."""
    log_dir = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(log_dir), "--tee", "3", TORCHRUN_SCRIPT]
    env = checkout_env(OMP_NUM_THREADS="1")  # the ranks import this checkout's torchrec_tt, installed or not
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: nothing outlives the test
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the torchrun job was still running after 120 s:\n{(stdout + stderr)[-3000:]}")
    end = time.time()
    output = stdout + stderr
    assert proc.returncode != 0, output[-3000:]
    assert end - start < 60, f"the job took {end - start:.1f} s"
    bad_step = float(re.search(r"rank 1: step 1 at ([0-9.]+)", output).group(1))
    print(f"torchrun job: {end - start:.1f} s in all, {end - bad_step:.1f} s from the bad batch to the job's exit")
    assert end - bad_step < 30, f"{end - bad_step:.1f} s from the bad batch to the job's exit"
    assert "rank 0: done" not in output and "rank 1: done" not in output

    (rank0_log,) = log_dir.glob("*/attempt_0/0/stderr.log")
    (rank1_log,) = log_dir.glob("*/attempt_0/1/stderr.log")
    message = re.compile(r"ValueError: table 't1', feature 'f2': .*\b85\b")
    assert message.search(rank1_log.read_text()), rank1_log.read_text()[-3000:]
    assert not message.search(rank0_log.read_text())  # the sender raised, not the owner
    assert "timed out" not in output.lower() and "timeout" not in rank0_log.read_text().lower()


# ---------------------------------------------------------------------------- 2 gloo ranks
def _sharded_model(fused_params: Dict[str, Any], in_backward: bool, ctx, validate_inputs: bool = True):
    torch.manual_seed(0)
    model = SparseArch(tt_tables("grt"), validate_inputs=validate_inputs)
    if in_backward:
        apply_optimizer_in_backward(torch.optim.Adam, model.tt.parameters(), {"lr": 0.01})
    sharders = [TTEmbeddingBagCollectionSharder(fused_params=fused_params)]
    return shard(model, ctx.pg, interleaved_plan(model, ctx.world_size, *sharders), sharders, ctx.device)


def _sharded_loss(dmp, ctx, seed: int, fail_in_loss: bool = False, bad_id: bool = False) -> torch.Tensor:
    extra = torch.ones(1, requires_grad=True)  # before the lookups: its backward runs after theirs
    late_term = FailInBackward.apply(extra) if fail_in_loss else extra
    batch = rank_batches(dmp.module, ctx.world_size, seed)[ctx.rank]
    if bad_id:
        batch = with_bad_id(batch)  # id 85 for feature f2 of table t1 (85 rows)
    return (dmp(batch) * loss_weights(ctx.world_size, 52, seed)[ctx.rank]).sum() + late_term.sum()


def _sharded_state(dmp):
    return snapshot(tt_params(dmp), dmp.fused_optimizer.state_dict()["state"])


def _sharded_faults_worker(rank: int, world_size: int) -> None:
    """Every rank fails the same way (a rank failing alone leaves the others in a collective)."""
    with rank_context(rank, world_size) as ctx:
        cases = [(name, fused_params, False) for name, fused_params in FUSED_PARAMS.items()] + [("adam in backward", {}, True)]
        for name, fused_params, in_backward in cases:
            dmp = _sharded_model(fused_params, in_backward, ctx)
            twin = _sharded_model(fused_params, in_backward, ctx)
            _sharded_loss(dmp, ctx, 0).backward()
            _sharded_loss(twin, ctx, 0).backward()
            before = _sharded_state(dmp)
            assert before[0] and before[1], f"{name}: rank {rank} holds TT cores with optimizer state"

            try:
                _sharded_loss(dmp, ctx, 1, fail_in_loss=True).backward()
                raise AssertionError("the failing loss did not raise")
            except RuntimeError as e:
                assert "loss backward failed" in str(e), e
            assert_same(_sharded_state(dmp), before, f"{name}, rank {rank}, failure in the loss")

            cores = list(tt_params(dmp).items())  # rank 0: t1's 2 cores; rank 1: t0's 3 and t2's 4
            for i in range(7):
                core_name, core = cores[i % len(cores)]
                handle = core.register_hook(raising_hook(core_name))
                try:
                    _sharded_loss(dmp, ctx, 1).backward()
                    raise AssertionError(f"the hook on {core_name} did not raise")
                except RuntimeError as e:
                    assert f"hook on {core_name} failed" in str(e), e
                handle.remove()
                assert_same(_sharded_state(dmp), before, f"{name}, rank {rank}, hook on {core_name}")

            try:
                _sharded_loss(dmp, ctx, 1, bad_id=True)
                raise AssertionError("the bad batch was accepted")
            except ValueError as e:
                assert re.search(r"table 't1', feature 'f2': .*\b85\b", str(e)), e
            assert_same(_sharded_state(dmp), before, f"{name}, rank {rank}, bad batch")

            _sharded_loss(dmp, ctx, 1).backward()
            _sharded_loss(twin, ctx, 1).backward()
            after = _sharded_state(dmp)
            assert_same(after, _sharded_state(twin), f"{name}, rank {rank}, the step after the failures")
            assert any(not torch.equal(after[0][k], before[0][k]) for k in before[0]), f"{name}: the good step stepped"


def _validation_worker(rank: int, world_size: int) -> None:
    """The sending rank checks each TT feature once, before the all-to-all; the owner does not
    check again; validate_inputs=False checks nothing."""
    with rank_context(rank, world_size) as ctx:
        calls = []
        original = tt_modules.validate_lookups

        def spy(config, feature, *args):
            calls.append((config.name, feature))
            return original(config, feature, *args)

        tt_modules.validate_lookups = spy
        try:
            for validate_inputs, expected in [
                (True, [("t0", "f0"), ("t0", "f1"), ("t1", "f2"), ("t2", "f3")]),
                (False, []),
            ]:
                dmp = _sharded_model({}, False, ctx, validate_inputs=validate_inputs)
                calls.clear()
                _sharded_loss(dmp, ctx, 0).backward()
                assert sorted(calls) == expected, (validate_inputs, calls)
        finally:
            tt_modules.validate_lookups = original


class TTShardedFaultsTest(FailFastMultiProcessTestBase):
    def test_failed_step_changes_no_rank(self) -> None:
        start = time.perf_counter()
        self._run_multi_process_test(callable=_sharded_faults_worker, world_size=2)
        print(f"sharded faults: {time.perf_counter() - start:.2f}s")

    def test_sender_validates_once(self) -> None:
        start = time.perf_counter()
        self._run_multi_process_test(callable=_validation_worker, world_size=2)
        print(f"sharded validation: {time.perf_counter() - start:.2f}s")


# ---------------------------------------------------------------------------- the multi-process runner
def _rank_1_fails_before_joining(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails before it joins the process group")
    with rank_context(rank, world_size):  # rank 0 waits here for rank 1 (gloo: up to 30 minutes)
        pass


class FailFastRunnerTest(FailFastMultiProcessTestBase):
    def test_a_failing_rank_stops_the_others(self) -> None:
        """A rank that fails while another waits for it (here in the process group's rendezvous)
        fails the test at once, with the failing rank's error; the waiting rank is terminated."""
        start = time.perf_counter()
        with self.assertRaises(AssertionError) as error:
            self._run_multi_process_test(callable=_rank_1_fails_before_joining, world_size=2)
        elapsed = time.perf_counter() - start
        assert elapsed < 60, f"the failure took {elapsed:.1f} s to surface"
        message = str(error.exception)
        assert "rank 1 of 2 failed" in message and "rank 1 fails before it joins the process group" in message, message
