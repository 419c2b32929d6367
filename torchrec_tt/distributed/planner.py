"""TorchRec planner support for TT tables: storage and perf estimators and a planner factory.

TT tables are planned under ``customized_kernel``, which TorchRec's estimators do not
price, so :class:`TTStorageEstimator` and :class:`TTPerfEstimator` price them and hand
every other sharding option (e.g. a regular ``EmbeddingBagCollection`` in the same
model) to TorchRec's estimators, so one planner call plans both.

* Storage: bytes of the cores plus their optimizer state (``optimizer_state_multiplier``)
  plus TorchRec's input/output buffer estimate, on HBM when the compute device is
  ``cuda`` and on DDR when it is ``cpu``.
* Perf: forward and backward FLOPs of the table's variant from
  :func:`torchrec_tt.op_counts.op_counts_from_stats` (the one source of op counts),
  divided by a FLOP rate. Table-wise: the owner computes every rank's bags and the comms
  are TorchRec's pooled all-to-all estimate. Data-parallel: each rank computes its own
  bags (``1 / world_size`` of the table-wise work), no forward comms, and the backward
  pays a ring all-reduce of the core bytes (:func:`tt_allreduce_ms`). The planner picks
  the cheaper per table (docs/design.md, section 9). Storage: data-parallel puts the
  cores, their optimizer state and a gradient bucket on every rank. The
  pooling factor ``P`` comes from ``ParameterConstraints.pooling_factors``; the distinct
  groups per bag ``P_G`` are measured on a sample batch when one is given, else
  modelled as uniform draws (:func:`torchrec_tt.op_counts.expected_groups_per_bag`).
* Hot-row cache (docs/design.md, section 10): storage adds the cached rows (with their
  optimizer state) and their ids; perf prices the TT part at ``(1 - h)`` of the lookups,
  with the hit rate ``h`` measured on the sample batch (its ``K`` most frequent ids taken as
  the cache) or modelled as ``K / num_embeddings`` (uniform access, a lower bound).

The ``estimate()`` signature changed between TorchRec 1.6 (``sharder_map``, positional)
and 1.8 (``sharder_data_map=``); both are accepted.
"""

import contextlib
import dataclasses
import inspect
import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import (
    _calculate_shard_io_sizes,
    calculate_pipeline_io_cost,
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
    get_num_poolings,
)
from torchrec.distributed.planner.types import ParameterConstraints, ShardEstimator, ShardingOption, Storage, Topology
from torchrec.distributed.types import ModuleSharder, PipelineType, ShardingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torch

from torchrec_tt.cache import top_rows
from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.distributed.optimizer import optimizer_state_multiplier
from torchrec_tt.distributed.sharded_module import TT_COMPUTE_KERNEL
from torchrec_tt.distributed.sharder import TT_CONFIG_ATTR
from torchrec_tt.enums import VariantLike
from torchrec_tt.op_counts import OpCounts, count_ops, expected_groups_per_bag, op_counts_from_stats

# TorchRec 1.8's estimators take picklable SharderData (``sharder_data_map``), 1.6's the
# sharders themselves (``sharder_map``).
_TAKES_SHARDER_DATA = "sharder_data_map" in inspect.signature(EmbeddingStorageEstimator.estimate).parameters
if _TAKES_SHARDER_DATA:
    from torchrec.distributed.planner.utils import build_sharder_data_map

# Effective FLOP rates of the TT kernels (FLOPs per millisecond; TorchRec's perf unit is ms).
# Small GEMM chains run far below peak; override with measured rates.
DEFAULT_FLOPS_PER_MS = {"cuda": 2.0e9, "mtia": 2.0e9, "cpu": 2.0e7}
BYTES_PER_INDEX = 8  # TorchRec's planner sizes input ids as int64


# ------------------------------------------------------------------ pure cost functions
@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Per-bag lookup statistics of one feature of a TT table.

    Attributes:
        pooling_factor (float): ``P``, ids per bag.
        groups_per_bag (float): ``P_G``, distinct groups per bag (``<= P``).
        num_bags (int): bags the statistics were measured on.
        hit_rate (float): share of the lookups served by the hot-row cache; then
            ``groups_per_bag`` is that of the TT part (the misses).
    """

    pooling_factor: float
    groups_per_bag: float
    num_bags: int = 1
    hit_rate: float = 0.0

    @staticmethod
    def pooled(stats: Sequence["GroupStats"]) -> "GroupStats":
        """Statistics of the union of the bags of ``stats``."""
        bags = sum(s.num_bags for s in stats)
        lookups = sum(s.pooling_factor * s.num_bags for s in stats)
        return GroupStats(
            pooling_factor=lookups / max(bags, 1),
            groups_per_bag=sum(s.groups_per_bag * s.num_bags for s in stats) / max(bags, 1),
            num_bags=bags,
            hit_rate=sum(s.hit_rate * s.pooling_factor * s.num_bags for s in stats) / max(lookups, 1e-30),
        )


def measure_group_stats(
    config: TTEmbeddingBagConfig, sample_batch: KeyedJaggedTensor
) -> Dict[str, GroupStats]:
    """``P`` and ``P_G`` of each of the table's features present in a sample batch.

    With a cache, its ``K`` rows are taken to be the batch's most frequent ids (as a warm-up
    would choose them); ``P_G`` is then that of the TT part and ``hit_rate`` is measured.
    """
    jagged = sample_batch.to_dict()
    features = [f for f in config.feature_names if f in jagged]
    cache_ids = None
    if config.cache_rows > 0 and features:
        ids = torch.cat([jagged[f].values().to(torch.int64) for f in features])
        cache_ids = top_rows(torch.bincount(ids, minlength=config.num_embeddings), config.cache_rows)
    stats = {}
    for feature in features:
        jt = jagged[feature]
        counts = count_ops(config, jt.values(), jt.offsets(), cache_ids=cache_ids)
        bags = max(counts.batch_size, 1)
        stats[feature] = GroupStats(
            (counts.num_lookups + counts.num_cache_hits) / bags, counts.groups_per_bag, counts.batch_size, counts.cache_hit_rate
        )
    return stats


def table_op_counts(
    config: TTEmbeddingBagConfig,
    bags: Sequence[float],
    pooling_factors: Sequence[float],
    groups_per_bag: Sequence[Optional[float]],
    hit_rates: Optional[Sequence[Optional[float]]] = None,
) -> OpCounts:
    """Op counts of one iteration of a table whose features contribute ``bags[f]`` bags.

    ``groups_per_bag[f]`` is the measured ``P_G`` of feature ``f`` (of its TT part, with a
    cache) or ``None`` to model it as distinct groups among ``P`` uniform draws. The distinct
    groups of the whole call (whose prefixes GRT computes once) are modelled the same way over
    all its ids, capped by the number of (bag, group) segments. With a cache, ``hit_rates[f]``
    (``None``: modelled as ``cache_rows / num_embeddings``) of the ``P`` lookups skip the TT
    part.
    """
    groups = config.num_groups
    num_bags = sum(bags)
    modelled = config.cache_rows / config.num_embeddings
    rates = [modelled if h is None else h for h in (hit_rates or [None] * len(bags))]
    num_hits = sum(b * p * h for b, p, h in zip(bags, pooling_factors, rates))
    pooling_factors = [p * (1.0 - h) for p, h in zip(pooling_factors, rates)]
    num_lookups = sum(b * p for b, p in zip(bags, pooling_factors))
    num_segments = sum(
        b * (pg if pg is not None else expected_groups_per_bag(groups, p))
        for b, p, pg in zip(bags, pooling_factors, groups_per_bag)
    )
    distinct = min(num_segments, expected_groups_per_bag(groups, num_lookups))
    return op_counts_from_stats(
        config,
        batch_size=max(1, int(round(num_bags))),
        num_lookups=num_lookups,
        num_segments=num_segments,
        num_distinct_groups=distinct,
        num_cache_hits=int(round(num_hits)),
    )


def tt_compute_ms(counts: OpCounts, variant: VariantLike, flops_per_ms: float) -> Tuple[float, float]:
    """``(forward, backward)`` milliseconds of ``variant`` at ``flops_per_ms``: the TT part and
    the cache's hits."""
    return counts.forward_flops(variant) / flops_per_ms, counts.backward_flops(variant) / flops_per_ms


def tt_table_bytes(config: TTEmbeddingBagConfig, optimizer_multiplier: float) -> int:
    """Bytes of the table's cores and cached rows plus their optimizer state, and the cache ids."""
    cached_rows = config.cache_bytes() - 8 * config.cache_rows
    return math.ceil((config.storage_bytes() + cached_rows) * (1.0 + optimizer_multiplier)) + 8 * config.cache_rows


def tt_allreduce_ms(num_bytes: float, world_size: int, bandwidth: float) -> float:
    """Milliseconds of a ring all-reduce of ``num_bytes`` over ``world_size`` ranks.

    Each rank sends and receives ``2 (W - 1) / W`` of the buffer; ``bandwidth`` in bytes
    per millisecond (TorchRec's unit). ``0`` on one rank.
    """
    if world_size <= 1:
        return 0.0
    return 2.0 * (world_size - 1) / world_size * num_bytes / bandwidth


def tt_shard_storage(
    config: TTEmbeddingBagConfig,
    compute_device: str,
    optimizer_multiplier: float,
    input_bytes: int,
    output_bytes: int,
    pipeline_type: PipelineType = PipelineType.NONE,
    data_parallel: bool = False,
) -> Storage:
    """Storage of a TT shard: cores + optimizer state + IO buffers.

    A data-parallel shard (one per rank) also holds the flat gradient bucket of its
    all-reduce (the cores' bytes). As TorchRec prices its own tables: on ``cuda``
    everything is HBM (IO through TorchRec's pipeline model), on ``cpu`` everything is DDR.
    """
    table = tt_table_bytes(config, optimizer_multiplier) + (config.storage_bytes() if data_parallel else 0)
    if compute_device in ("cuda", "mtia"):
        io = calculate_pipeline_io_cost(
            input_size=input_bytes,
            output_size=output_bytes,
            prefetch_size=0,
            pipeline_type=pipeline_type,
            multipass_prefetch_max_pass=None,
        )
        return Storage(hbm=table + io, ddr=0)
    return Storage(hbm=0, ddr=table + input_bytes + output_bytes)


# ------------------------------------------------------------------ estimator plumbing
def _tt_config(option: ShardingOption) -> Optional[TTEmbeddingBagConfig]:
    if option.compute_kernel != TT_COMPUTE_KERNEL.value:
        return None
    return getattr(option.tensor, TT_CONFIG_ATTR, None)


def _is_data_parallel(option: ShardingOption) -> bool:
    return option.sharding_type == ShardingType.DATA_PARALLEL.value


def _allreduce_bandwidth(topology: Topology) -> float:
    """Bytes per ms of the all-reduce: intra-host when all ranks share a host (TorchRec
    1.8 keeps bandwidths in ``comms_bandwidths``, 1.6 on the topology)."""
    bandwidths = getattr(topology, "comms_bandwidths", topology)
    single_host = topology.world_size <= topology.local_world_size
    return bandwidths.intra_host_bw if single_host else bandwidths.inter_host_bw


def _sharder_data(sharder_map: Optional[Mapping[str, Any]], sharder_data_map: Optional[Mapping[str, Any]]) -> Any:
    """The sharder map in the form the installed TorchRec's estimators take."""
    data = sharder_data_map if sharder_data_map is not None else sharder_map
    if _TAKES_SHARDER_DATA and data and any(isinstance(v, ModuleSharder) for v in data.values()):
        data = build_sharder_data_map(dict(data))
    return data


def _poolings_and_batch_sizes(
    constraints: Dict[str, ParameterConstraints], option: ShardingOption
) -> Tuple[List[float], List[int]]:
    """Per feature: poolings per sample and batch size, as TorchRec's estimators read them."""
    constraint = constraints.get(option.name)
    batch_sizes = (
        list(constraint.batch_sizes) if constraint and constraint.batch_sizes else [option.batch_size] * option.num_inputs
    )
    return list(get_num_poolings(constraints, option)), batch_sizes


def _optimizer_multiplier(option: ShardingOption) -> float:
    """From the stand-in parameter, which the sharder tags with the cores' optimizer."""
    classes = getattr(option.tensor, "_optimizer_classes", None)
    if not classes:
        return 0.0
    return optimizer_state_multiplier(classes[0], getattr(option.tensor, "_optimizer_kwargs", [{}])[0])


@contextlib.contextmanager
def _priced_as_fused(options: List[ShardingOption]) -> Iterator[None]:
    """Let TorchRec's estimators price ``options`` as ``fused`` tables (for comms and IO);
    TorchRec rejects the ``customized_kernel`` tag in its kernel bandwidth lookup."""
    for option in options:
        option.compute_kernel = "fused"
    try:
        yield
    finally:
        for option in options:
            option.compute_kernel = TT_COMPUTE_KERNEL.value


class TTStorageEstimator(ShardEstimator):
    """Storage of TT shards (cores + optimizer state + IO); others go to TorchRec's estimator.

    Args:
        topology (Topology): device topology.
        constraints (Optional[Dict[str, ParameterConstraints]]): per-table constraints.
        pipeline_type (PipelineType): training pipeline, for TorchRec's IO buffer model.
        **kwargs: passed to ``EmbeddingStorageEstimator`` for the other tables.
    """

    def __init__(
        self,
        topology: Topology,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        pipeline_type: PipelineType = PipelineType.NONE,
        **kwargs: Any,
    ) -> None:
        self._topology = topology
        self._constraints = constraints or {}
        self._pipeline_type = pipeline_type
        self._base = EmbeddingStorageEstimator(topology, constraints, pipeline_type=pipeline_type, **kwargs)

    def estimate(
        self,
        sharding_options: List[ShardingOption],
        sharder_map: Optional[Mapping[str, Any]] = None,
        sharder_data_map: Optional[Mapping[str, Any]] = None,
    ) -> None:
        data = _sharder_data(sharder_map, sharder_data_map)
        others = [o for o in sharding_options if _tt_config(o) is None]
        if others:
            self._base.estimate(others, data)
        for option in sharding_options:
            config = _tt_config(option)
            if config is None:
                continue
            num_poolings, batch_sizes = _poolings_and_batch_sizes(self._constraints, option)
            input_sizes, output_sizes = _calculate_shard_io_sizes(
                sharding_type=option.sharding_type,
                batch_sizes=batch_sizes,
                world_size=self._topology.world_size,
                local_world_size=self._topology.intra_group_size,
                input_lengths=option.input_lengths,
                emb_dim=config.embedding_dim,
                shard_sizes=[shard.size for shard in option.shards],
                input_data_type_size=BYTES_PER_INDEX,
                output_data_type_size=option.tensor.element_size(),
                num_poolings=num_poolings,
                is_pooled=True,
            )
            multiplier = _optimizer_multiplier(option)
            for shard, input_bytes, output_bytes in zip(option.shards, input_sizes, output_sizes):
                shard.storage = tt_shard_storage(
                    config,
                    self._topology.compute_device,
                    multiplier,
                    input_bytes,
                    output_bytes,
                    self._pipeline_type,
                    data_parallel=_is_data_parallel(option),
                )


class TTPerfEstimator(ShardEstimator):
    """Perf of TT shards from their variant's FLOPs; others go to TorchRec's estimator.

    Args:
        topology (Topology): device topology.
        constraints (Optional[Dict[str, ParameterConstraints]]): per-table constraints;
            ``pooling_factors`` give ``P`` per feature.
        sample_batch (Optional[KeyedJaggedTensor]): a representative input batch; when
            given, ``P_G`` (and ``P`` for tables without ``pooling_factors``) are measured
            on it, else ``P_G`` is modelled as uniform draws.
        flops_per_ms (Optional[float]): effective FLOP rate of the TT kernels; default
            from ``DEFAULT_FLOPS_PER_MS`` for the topology's compute device.
        **kwargs: passed to ``EmbeddingPerfEstimator`` for comms and the other tables.
    """

    def __init__(
        self,
        topology: Topology,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        sample_batch: Optional[KeyedJaggedTensor] = None,
        flops_per_ms: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        self._topology = topology
        self._constraints = constraints or {}
        self._sample_batch = sample_batch
        self._flops_per_ms = flops_per_ms or DEFAULT_FLOPS_PER_MS.get(topology.compute_device, DEFAULT_FLOPS_PER_MS["cpu"])
        self._measured: Dict[str, Dict[str, GroupStats]] = {}
        self._base = EmbeddingPerfEstimator(topology, constraints, **kwargs)

    def estimate(
        self,
        sharding_options: List[ShardingOption],
        sharder_map: Optional[Mapping[str, Any]] = None,
        sharder_data_map: Optional[Mapping[str, Any]] = None,
    ) -> None:
        data = _sharder_data(sharder_map, sharder_data_map)
        tt_options = [o for o in sharding_options if _tt_config(o) is not None]
        with _priced_as_fused(tt_options):
            self._base.estimate(sharding_options, data)
        for option in tt_options:
            config = _tt_config(option)
            fwd, bwd = tt_compute_ms(self.op_counts(option, config), config.variant, self._flops_per_ms)
            comms = {}
            if _is_data_parallel(option):  # no all-to-all; one all-reduce of the core gradients
                allreduce = tt_allreduce_ms(config.storage_bytes(), self._topology.world_size, _allreduce_bandwidth(self._topology))
                comms = {"fwd_comms": 0.0, "bwd_comms": allreduce, "input_dist_comms": 0.0}
                fields = {f.name for f in dataclasses.fields(option.shards[0].perf)}  # 1.6 has no input_dist_comms
                comms = {k: v for k, v in comms.items() if k in fields}
            for shard in option.shards:
                shard.perf = dataclasses.replace(shard.perf, fwd_compute=fwd, bwd_compute=bwd, **comms)

    def op_counts(self, option: ShardingOption, config: TTEmbeddingBagConfig) -> OpCounts:
        """Modelled or measured op counts of one iteration of one shard: every rank's bags
        (table-wise) or this rank's (data-parallel)."""
        constraint = self._constraints.get(option.name)
        has_pooling_factors = bool(constraint and constraint.pooling_factors)
        measured = self._group_stats(config)
        num_poolings, batch_sizes = _poolings_and_batch_sizes(self._constraints, option)
        # TorchRec prices a table as one input unless constraints give one pooling factor
        # per feature; measured statistics follow the same split.
        if len(config.feature_names) == option.num_inputs:
            input_stats = [measured.get(f) for f in config.feature_names]
        else:
            pooled = GroupStats.pooled(list(measured.values())) if measured else None
            input_stats = [pooled] * option.num_inputs
        bags, pooling_factors, groups_per_bag, hit_rates = [], [], [], []
        for stats, length, pools, batch in zip(input_stats, option.input_lengths, num_poolings, batch_sizes):
            # Table-wise: the owner pools every rank's bags of the input; data-parallel: its own.
            ranks = 1 if _is_data_parallel(option) else self._topology.world_size
            bags.append(batch * pools * ranks)
            hit_rates.append(None if stats is None else stats.hit_rate)
            if stats is None:
                pooling_factors.append(length)
                groups_per_bag.append(None)
            else:
                p = length if has_pooling_factors else stats.pooling_factor
                pooling_factors.append(p)
                groups_per_bag.append(p * stats.groups_per_bag / stats.pooling_factor if stats.pooling_factor else 0.0)
        return table_op_counts(config, bags, pooling_factors, groups_per_bag, hit_rates)

    def _group_stats(self, config: TTEmbeddingBagConfig) -> Dict[str, GroupStats]:
        if self._sample_batch is None:
            return {}
        if config.name not in self._measured:
            self._measured[config.name] = measure_group_stats(config, self._sample_batch)
        return self._measured[config.name]


class TTEmbeddingEnumerator(EmbeddingEnumerator):
    """TorchRec's enumerator without data-parallel options for TT tables that have no fused
    optimizer (their replicated cores could not be kept in sync)."""

    def enumerate(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> List[ShardingOption]:
        options = super().enumerate(module, sharders)
        return [
            o
            for o in options
            if not (_tt_config(o) is not None and _is_data_parallel(o) and not getattr(o.tensor, "_optimizer_classes", None))
        ]


def make_tt_planner(
    topology: Topology,
    batch_size: int,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    sample_batch: Optional[KeyedJaggedTensor] = None,
    flops_per_ms: Optional[float] = None,
    pipeline_type: PipelineType = PipelineType.NONE,
    **planner_kwargs: Any,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` that prices TT tables with the TT estimators.

    Plans TT and regular TorchRec tables of a model in one call (``plan`` or
    ``collective_plan`` with both sharders), choosing ``table_wise`` or
    ``data_parallel`` for each TT table (data-parallel only for tables with a fused
    optimizer); the plan stats table (``debug=True``) shows the choice.

    Args:
        topology (Topology): device topology (``compute_device``, ``hbm_cap``, ...).
        batch_size (int): per-rank batch size.
        constraints (Optional[Dict[str, ParameterConstraints]]): per-table constraints.
        sample_batch (Optional[KeyedJaggedTensor]): representative batch for ``P_G``.
        flops_per_ms (Optional[float]): effective FLOP rate of the TT kernels.
        pipeline_type (PipelineType): training pipeline, for the IO buffer model.
        **planner_kwargs: more ``EmbeddingShardingPlanner`` arguments.
    """
    enumerator = TTEmbeddingEnumerator(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        estimator=[
            TTPerfEstimator(topology, constraints, sample_batch=sample_batch, flops_per_ms=flops_per_ms),
            TTStorageEstimator(topology, constraints, pipeline_type=pipeline_type),
        ],
    )
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        enumerator=enumerator,
        constraints=constraints,
        **planner_kwargs,
    )
