"""TT planner estimators: pure cost functions, estimator plumbing and whole plans (no process group)."""

import math

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.planner.utils import sharder_name

from tt_dist_testing import SparseArch, ebc_tables, tt_tables
from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig, count_ops, expected_groups_per_bag
from torchrec_tt.distributed import (
    GroupStats,
    TTEmbeddingBagCollectionSharder,
    TTPerfEstimator,
    TTStorageEstimator,
    make_tt_planner,
    measure_group_stats,
    table_op_counts,
    tt_allreduce_ms,
    tt_compute_ms,
    tt_shard_storage,
    tt_table_bytes,
)
from torchrec_tt.distributed.optimizer import optimizer_state_multiplier

MB = 1024**2


def paper_table(name: str = "paper", variant: str = "grt", features=("p0",)) -> TTEmbeddingBagConfig:
    """The GRT-GnR paper's table: rows [21, 22, 50], dims [4, 4, 4], ranks [32, 32]."""
    return TTEmbeddingBagConfig(
        name=name, num_embeddings=23100, embedding_dim=64, feature_names=list(features),
        tt_p_shapes=[21, 22, 50], tt_q_shapes=[4, 4, 4], tt_ranks=[32, 32], variant=variant,
    )


# ------------------------------------------------------------------ storage
@pytest.mark.parametrize(
    "optimizer_class, kwargs",
    [(torch.optim.SGD, {"lr": 0.1}), (torch.optim.Adagrad, {"lr": 0.1}), (torch.optim.Adam, {"lr": 0.01})],
    ids=["sgd", "adagrad", "adam"],
)
def test_paper_table_storage_within_5_percent_of_real_bytes(optimizer_class, kwargs) -> None:
    config = paper_table()
    module = TTEmbeddingBagCollection([config])
    optimizer = optimizer_class(module.parameters(), **kwargs)
    kjt = KeyedJaggedTensor(keys=["p0"], values=torch.tensor([1, 5, 23000]), lengths=torch.tensor([2, 1]))
    module(kjt).values().sum().backward()
    optimizer.step()
    real = sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    estimated = tt_table_bytes(config, optimizer_state_multiplier(optimizer_class, kwargs))
    assert abs(estimated - real) <= 0.05 * real, (estimated, real)
    print(f"{optimizer_class.__name__}: estimated {estimated} B, real {real} B ({estimated / real - 1:+.4%})")


def test_storage_goes_to_hbm_on_cuda_and_ddr_on_cpu() -> None:
    config = paper_table()
    cuda = tt_shard_storage(config, "cuda", 2.0, input_bytes=100, output_bytes=200)
    cpu = tt_shard_storage(config, "cpu", 2.0, input_bytes=100, output_bytes=200)
    table = tt_table_bytes(config, 2.0)
    assert table == 3 * config.storage_bytes()
    assert (cuda.hbm, cuda.ddr) == (table + 300, 0)
    assert (cpu.hbm, cpu.ddr) == (0, table + 300)


def test_planner_storage_is_cores_optimizer_and_io() -> None:
    model = SparseArch([paper_table()])
    sharder = TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01})
    topology = Topology(world_size=2, compute_device="cuda", hbm_cap=64 * MB)
    options = EmbeddingEnumerator(topology, 64, estimator=[TTStorageEstimator(topology)]).enumerate(model, [sharder])
    by_type = {o.sharding_type: o for o in options}
    assert sorted(by_type) == ["data_parallel", "table_wise"]
    # 64 bags of one id per rank, both ranks' bags pooled at the owner: int64 ids in, fp32 rows out.
    io = 2 * 64 * 8 + 2 * 64 * 64 * 4
    (tw,) = by_type["table_wise"].shards
    assert tw.storage.hbm == 3 * paper_table().storage_bytes() + io
    assert tw.storage.ddr == 0
    # Data-parallel: on every rank, + the gradient bucket, local bags only.
    dp = by_type["data_parallel"].shards
    assert [s.storage.hbm for s in dp] == [4 * paper_table().storage_bytes() + 64 * 8 + 64 * 64 * 4] * 2


def test_hbm_too_small_for_uncompressed_tables_still_plans() -> None:
    tables = [paper_table("a", features=("a",)), paper_table("b", features=("b",))]
    dense_bytes = tables[0].dense_bytes()  # 5.9 MB per table
    cap = 2 * MB
    topology = Topology(world_size=2, compute_device="cuda", hbm_cap=cap)
    sharder = TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD})
    plan = make_tt_planner(topology, batch_size=32).plan(SparseArch(tables), [sharder])
    ranks = sorted(plan.plan["tt"][t.name].ranks[0] for t in tables)
    assert ranks == [0, 1], plan  # one table per rank: two do not fit one rank
    assert 2 * tables[0].storage_bytes() < cap < dense_bytes

    # The same tables uncompressed do not fit in HBM: TorchRec's own planner gives up.
    dense = nn.Module()
    dense.ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim,
                            feature_names=list(t.feature_names)) for t in tables],
        device=torch.device("meta"),
    )
    with pytest.raises(PlannerError):
        hbm_only = {t.name: ParameterConstraints(compute_kernels=["fused"]) for t in tables}
        EmbeddingShardingPlanner(topology=topology, batch_size=32, constraints=hbm_only).plan(
            dense, [EmbeddingBagCollectionSharder()]
        )


def test_plan_stats_see_real_table_bytes() -> None:
    """TorchRec's stats size a table as its parameter's rows x dim: the stand-in has the cores' bytes."""
    config = paper_table()
    (param,) = TTEmbeddingBagCollectionSharder().shardable_parameters(TTEmbeddingBagCollection([config])).values()
    assert param.shape[1] == config.embedding_dim
    assert 0 <= param.numel() * 4 - config.storage_bytes() < config.embedding_dim * 4


# ------------------------------------------------------------------ compute
def clustered_batch(features, batch_size: int, ids_per_group: int, groups_per_bag: int, seed: int = 0) -> KeyedJaggedTensor:
    """Bags of ``groups_per_bag`` random groups, ``ids_per_group`` distinct rows in each."""
    g = torch.Generator().manual_seed(seed)
    config = paper_table()
    last = config.tt_p_shapes[-1]
    values = []
    for _ in features:
        for _ in range(batch_size):
            groups = torch.randperm(config.num_groups - 1, generator=g)[:groups_per_bag]
            for group in groups.tolist():
                values.append(group * last + torch.randperm(last, generator=g)[:ids_per_group])
    lengths = torch.full((len(features) * batch_size,), ids_per_group * groups_per_bag)
    return KeyedJaggedTensor(keys=list(features), values=torch.cat(values), lengths=lengths)


def variant_options(batch_size: int, pooling: float, sample=None, world_size: int = 1):
    tables = [paper_table("g", "grt", ("g",)), paper_table("t", "tt", ("t",))]
    constraints = {t.name: ParameterConstraints(pooling_factors=[pooling]) for t in tables}
    topology = Topology(world_size=world_size, compute_device="cuda")
    perf = TTPerfEstimator(topology, constraints, sample_batch=sample)
    options = EmbeddingEnumerator(topology, batch_size, constraints, estimator=[perf]).enumerate(
        SparseArch(tables), [TTEmbeddingBagCollectionSharder()]
    )
    return {o.name: o.shards[0].perf for o in options}


def test_grt_compute_below_tt_by_groups_per_bag_ratio() -> None:
    # Measured P_G = 10 of P = 40; a small batch so GRT's cross-bag prefix reuse is negligible.
    sample = clustered_batch(["g", "t"], batch_size=4, ids_per_group=4, groups_per_bag=10)
    perf = variant_options(batch_size=2, pooling=40.0, sample=sample)
    ratio = 10 / 40
    assert perf["g"].fwd_compute / perf["t"].fwd_compute == pytest.approx(ratio, rel=0.05)
    assert perf["g"].bwd_compute / perf["t"].bwd_compute == pytest.approx(ratio, rel=0.05)
    # Larger batches share group prefixes across bags: GRT only gets cheaper.
    big = variant_options(batch_size=512, pooling=40.0, sample=sample)
    assert big["g"].fwd_compute / big["t"].fwd_compute < ratio


def test_groups_per_bag_modelled_as_uniform_draws_without_sample() -> None:
    config = paper_table()
    groups = config.num_groups
    for pooling in (1.0, 20.0, 80.0, 400.0):
        modelled = table_op_counts(config, [64], [pooling], [None]).groups_per_bag
        assert modelled == pytest.approx(groups * (1 - (1 - 1 / groups) ** pooling), rel=1e-9)
    perf = variant_options(batch_size=1, pooling=80.0)
    p_g = expected_groups_per_bag(groups, 80.0)
    assert perf["g"].fwd_compute / perf["t"].fwd_compute == pytest.approx(p_g / 80.0, rel=0.05)


def test_measured_group_stats_match_count_ops() -> None:
    config = paper_table()
    sample = clustered_batch(["p0"], batch_size=8, ids_per_group=5, groups_per_bag=3)
    stats = measure_group_stats(config, sample)["p0"]
    jt = sample.to_dict()["p0"]
    counts = count_ops(config, jt.values(), jt.offsets())
    assert (stats.pooling_factor, stats.groups_per_bag) == (15.0, 3.0) == (counts.pooling_factor, counts.groups_per_bag)
    modelled = table_op_counts(config, [8], [15.0], [3.0])
    assert (modelled.num_lookups, modelled.num_segments) == (counts.num_lookups, counts.num_segments)


def test_tt_compute_ms_uses_op_counts() -> None:
    counts = table_op_counts(paper_table(), [100], [20.0], [None])
    assert tt_compute_ms(counts, "grt", 1e6) == (counts.grt_flops / 1e6, counts.grt_backward_flops / 1e6)
    assert tt_compute_ms(counts, "tt", 1e6) == (counts.tt_flops / 1e6, counts.tt_backward_flops / 1e6)


# ------------------------------------------------------------------ plumbing
def test_estimate_accepts_both_torchrec_call_signatures() -> None:
    model = SparseArch(tt_tables("grt"), ebc_tables())
    sharders = [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    topology = Topology(world_size=2, compute_device="cpu")
    perf, storage = TTPerfEstimator(topology), TTStorageEstimator(topology)
    options = EmbeddingEnumerator(topology, 16, estimator=[perf, storage]).enumerate(model, sharders)
    expected = [(o.name, o.compute_kernel, [(s.perf, s.storage) for s in o.shards]) for o in options]
    assert {"customized_kernel", "fused"} <= {o.compute_kernel for o in options}

    sharder_map = {sharder_name(s.module_type): s for s in sharders}
    for option in options:
        for shard in option.shards:
            shard.perf = shard.storage = None
    for estimator in (perf, storage):
        estimator.estimate(options, sharder_map)  # TorchRec 1.6: sharder_map, positional
    assert [(o.name, o.compute_kernel, [(s.perf, s.storage) for s in o.shards]) for o in options] == expected
    for option in options:
        for shard in option.shards:
            shard.perf = shard.storage = None
    for estimator in (perf, storage):
        estimator.estimate(options, sharder_data_map=sharder_map)  # TorchRec 1.8: keyword
    assert [(o.name, o.compute_kernel, [(s.perf, s.storage) for s in o.shards]) for o in options] == expected


def test_one_planner_call_plans_tt_and_regular_tables() -> None:
    model = SparseArch(tt_tables("tt"), ebc_tables())
    sharders = [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    plan = make_tt_planner(Topology(world_size=2, compute_device="cpu"), batch_size=16).plan(model, sharders)
    assert {k: sorted(v) for k, v in plan.plan.items()} == {"tt": ["t0", "t1", "t2"], "ebc": ["e0"]}
    assert {p.compute_kernel for p in plan.plan["tt"].values()} == {"customized_kernel"}
    assert {p.compute_kernel for p in plan.plan["ebc"].values()} == {"fused"}


def test_optimizer_state_multiplier() -> None:
    assert optimizer_state_multiplier(None) == 0
    assert optimizer_state_multiplier(torch.optim.SGD, {"lr": 0.1}) == 0
    assert optimizer_state_multiplier(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}) == 1
    assert optimizer_state_multiplier(torch.optim.Adagrad) == 1
    assert optimizer_state_multiplier(torch.optim.Adam) == 2
    assert optimizer_state_multiplier(torch.optim.Adam, {"amsgrad": True}) == 3
    assert math.isclose(tt_table_bytes(paper_table(), 1.0), 2 * paper_table().storage_bytes())


def test_two_feature_table_priced_as_torchrec_inputs() -> None:
    """Without per-feature pooling factors TorchRec prices a table as one input: the
    measured statistics of its features are pooled."""
    config = paper_table(features=("x", "y"))
    sample = KeyedJaggedTensor.concat(
        [
            clustered_batch(["x"], batch_size=4, ids_per_group=4, groups_per_bag=2),
            clustered_batch(["y"], batch_size=4, ids_per_group=2, groups_per_bag=6, seed=1),
        ]
    )
    stats = measure_group_stats(config, sample)
    pooled = GroupStats.pooled(list(stats.values()))
    assert (pooled.pooling_factor, pooled.groups_per_bag, pooled.num_bags) == (10.0, 4.0, 8)

    topology = Topology(world_size=1, compute_device="cuda")
    perf = TTPerfEstimator(topology, sample_batch=sample)
    (option,) = [
        o
        for o in EmbeddingEnumerator(topology, 8, estimator=[perf]).enumerate(SparseArch([config]), [TTEmbeddingBagCollectionSharder()])
        if o.sharding_type == "table_wise"
    ]
    counts = perf.op_counts(option, config)
    assert option.num_inputs == 1 and (counts.pooling_factor, counts.groups_per_bag) == (10.0, 4.0)


# ------------------------------------------------------------------ table-wise or data-parallel
def small_table(name: str) -> TTEmbeddingBagConfig:
    """A few KB of cores (the main job's item tables are of this kind)."""
    return TTEmbeddingBagConfig(
        name=name, num_embeddings=1000, embedding_dim=16, feature_names=[name],
        tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 2, 4], tt_ranks=[4, 5],
    )


ADAGRAD = {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1}


def _plan(tables, pooling, bandwidth: float, batch_size: int, sharder=None, caplog=None):
    topology = Topology(world_size=2, compute_device="cpu", intra_host_bw=bandwidth)
    constraints = {t.name: ParameterConstraints(pooling_factors=[pooling[t.name]]) for t in tables}
    sharder = sharder or TTEmbeddingBagCollectionSharder(fused_params=ADAGRAD)
    model = SparseArch(tables)
    options = EmbeddingEnumerator(
        topology, batch_size, constraints, estimator=[TTPerfEstimator(topology, constraints)]
    ).enumerate(model, [sharder])
    perf = {(o.name, o.sharding_type): o.shards[0].perf for o in options}
    plan = make_tt_planner(topology, batch_size, constraints, debug=caplog is not None).plan(model, [sharder])
    return {name: p.sharding_type for name, p in plan.plan["tt"].items()}, perf


def test_allreduce_ms_is_ring_traffic_over_bandwidth() -> None:
    assert tt_allreduce_ms(1000.0, 1, 10.0) == 0.0
    assert tt_allreduce_ms(1000.0, 2, 10.0) == pytest.approx(100.0)  # 2 * 1/2 * 1000 / 10
    assert tt_allreduce_ms(1000.0, 4, 10.0) == pytest.approx(150.0)


def test_planner_picks_data_parallel_for_a_hot_small_core_table(caplog) -> None:
    """The main job's shape: a hot history table (P = 44) and a cold candidate table
    (P = 1). Table-wise, one rank computes all the history bags; data-parallel halves
    that for an all-reduce of a few KB."""
    tables = [small_table("hist"), small_table("cand")]
    with caplog.at_level("INFO", logger="torchrec.distributed.planner.stats"):
        choice, perf = _plan(tables, {"hist": 44.0, "cand": 1.0}, bandwidth=1e6, batch_size=256, caplog=caplog)
    assert choice["hist"] == "data_parallel", choice
    dp, tw = perf[("hist", "data_parallel")], perf[("hist", "table_wise")]
    # Per rank: its own bags, half the lookups; a row looked up by bags of both ranks is computed
    # on both (the row path computes each distinct row of a batch once), so more than half.
    assert tw.fwd_compute / 2 <= dp.fwd_compute < 0.75 * tw.fwd_compute
    assert dp.fwd_comms == 0 and dp.bwd_comms == pytest.approx(tt_allreduce_ms(tables[0].storage_bytes(), 2, 1e6))
    assert dp.total < tw.total
    # The plan stats table shows the choice (TorchRec's abbreviation, per table).
    rows = [r.getMessage() for r in caplog.records if "tt.hist " in r.getMessage()]
    assert rows and all(" DP " in r for r in rows), rows


def test_planner_keeps_table_wise_when_the_allreduce_costs_more() -> None:
    """Large cores, few lookups, slow links: the all-reduce of the core gradients costs
    more than the compute data-parallel saves."""
    table = paper_table("big", features=("big",))
    choice, perf = _plan([table], {"big": 1.0}, bandwidth=2e5, batch_size=64)
    dp, tw = perf[("big", "data_parallel")], perf[("big", "table_wise")]
    assert tw.total < dp.total, (tw, dp)
    assert choice == {"big": "table_wise"}
    # With fast links the same table goes data-parallel.
    choice, perf = _plan([table], {"big": 1.0}, bandwidth=1e9, batch_size=64)
    assert perf[("big", "data_parallel")].total < perf[("big", "table_wise")].total
    assert choice == {"big": "data_parallel"}


def test_no_data_parallel_without_a_fused_optimizer() -> None:
    """Replicated cores stay in sync only through the fused optimizer's all-reduce."""
    choice, _ = _plan([small_table("hist"), small_table("cand")], {"hist": 44.0, "cand": 1.0}, 1e6, 256,
                      sharder=TTEmbeddingBagCollectionSharder())
    assert set(choice.values()) == {"table_wise"}, choice
