"""Sharded :class:`~torchrec_tt.modules.TTEmbeddingBagCollection`: table-wise and data-parallel.

Built on TorchRec's table-wise parts (``TwPooledEmbeddingSharding``, its KJT and pooled
all-to-alls, ``GroupedPooledEmbeddingsLookup``) and data-parallel parts
(``DpPooledEmbeddingSharding``: no communication in forward) with the TT kernel plugged in
under ``EmbeddingComputeKernel.CUSTOMIZED_KERNEL``. Data-parallel cores are replicated;
their gradients are averaged over the ranks by one bucketed all-reduce per backward,
before the deferred in-backward optimizer step (:mod:`torchrec_tt.distributed.optimizer`).
TorchRec leaves state-dict handling of such tables to the module, so this one produces
and accepts the unsharded keys ``embedding_bags.<table>.cores.<k>`` itself:
``state_dict()`` broadcasts every table-wise core from its owning rank (a collective:
call it on all ranks; data-parallel cores are already everywhere), so every rank holds
the whole table set and a checkpoint loads at any world size, under any mix of
table-wise and data-parallel tables, and into the unsharded module.
"""

from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.distributed.embedding_sharding import (
    EmbeddingShardingContext,
    EmbeddingShardingInfo,
    KJTListSplitsAwaitable,
)
from torchrec.distributed.embedding_types import (
    BaseEmbeddingLookup,
    BaseGroupedFeatureProcessor,
    EmbeddingComputeKernel,
    GroupedEmbeddingConfig,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionAwaitable, EmbeddingBagCollectionContext
from torchrec.distributed.embedding_sharding import EmbeddingSharding
from torchrec.distributed.sharding.dp_sharding import DpPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.modules.embedding_configs import EmbeddingTableConfig
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt import modules as tt_modules
from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.distributed.embedding_kernel import TTEmbeddingBagKernel
from torchrec_tt.distributed.optimizer import optimizer_fused_params
from torchrec_tt.cache import CacheUpdate
from torchrec_tt.modules import TTEmbeddingBag, TTEmbeddingBagCollection

TT_COMPUTE_KERNEL = EmbeddingComputeKernel.CUSTOMIZED_KERNEL
# Sharding types of TT tables, in the order their features and outputs are laid out.
TT_SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.DATA_PARALLEL.value)


class TTGroupedPooledEmbeddingsLookup(GroupedPooledEmbeddingsLookup):
    """TorchRec's grouped pooled lookup, running :class:`TTEmbeddingBagKernel` for TT groups."""

    def _create_embedding_kernel(
        self,
        config: GroupedEmbeddingConfig,
        device: Optional[torch.device],
        pg: Optional[dist.ProcessGroup],
        sharding_type: Optional[ShardingType],
        env: Optional[ShardingEnv] = None,
    ) -> TTEmbeddingBagKernel:
        if config.compute_kernel != TT_COMPUTE_KERNEL:
            raise ValueError(
                f"tables {config.table_names()}: compute kernel {config.compute_kernel.value!r} is not "
                f"supported for TT tables, expected {TT_COMPUTE_KERNEL.value!r}"
            )
        data_parallel = sharding_type == ShardingType.DATA_PARALLEL
        return TTEmbeddingBagKernel(config, pg=pg, device=device, data_parallel=data_parallel)


class _TTLookupSharding:
    """``create_lookup`` of a TorchRec sharding, with the TT lookup (mixed in first)."""

    tt_sharding_type: ShardingType

    def create_lookup(
        self,
        device: Optional[torch.device] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        feature_processor: Optional[BaseGroupedFeatureProcessor] = None,
    ) -> BaseEmbeddingLookup:
        return TTGroupedPooledEmbeddingsLookup(
            grouped_configs=self._grouped_embedding_configs,  # pyre-ignore[16]
            device=device if device is not None else self._device,  # pyre-ignore[16]
            pg=self._env.process_group,  # pyre-ignore[16]
            feature_processor=feature_processor,
            sharding_type=self.tt_sharding_type,
            env=self._env,  # pyre-ignore[16]
        )


class TTTwPooledEmbeddingSharding(_TTLookupSharding, TwPooledEmbeddingSharding):
    """Table-wise sharding of TT tables: TorchRec's, with the TT lookup."""

    tt_sharding_type = ShardingType.TABLE_WISE


class TTDpPooledEmbeddingSharding(_TTLookupSharding, DpPooledEmbeddingSharding):
    """Data-parallel TT tables: TorchRec's (no forward communication), with the TT lookup,
    whose kernels all-reduce the core gradients before the optimizer step."""

    tt_sharding_type = ShardingType.DATA_PARALLEL


_SHARDING_CLASSES: Dict[str, Type[EmbeddingSharding]] = {
    ShardingType.TABLE_WISE.value: TTTwPooledEmbeddingSharding,
    ShardingType.DATA_PARALLEL.value: TTDpPooledEmbeddingSharding,
}


def _in_backward_optimizer(bag: TTEmbeddingBag) -> Dict[str, Any]:
    """``fused_params`` for an ``apply_optimizer_in_backward`` optimizer on the table's cores."""
    classes = [getattr(core, "_optimizer_classes", None) for core in bag.cores]
    kwargs = [getattr(core, "_optimizer_kwargs", None) for core in bag.cores]
    if all(c is None for c in classes):
        return {}
    if any(c != classes[0] for c in classes) or any(k != kwargs[0] for k in kwargs) or len(classes[0]) != 1:
        raise ValueError(
            f"table '{bag.config.name}': all cores need the same single in-backward optimizer, "
            f"got classes {classes} and kwargs {kwargs}"
        )
    return optimizer_fused_params(classes[0][0], kwargs[0][0])


def table_fused_params(bag: TTEmbeddingBag, sharder_fused_params: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Sharder fused params, then the table's own optimizer, then its TT layout (hashable)."""
    fused_params = dict(sharder_fused_params or {})
    fused_params.update(_in_backward_optimizer(bag))
    fused_params.update(dict(bag.config.tt_fused_params()))
    return fused_params


class ShardedTTEmbeddingBagCollection(
    tt_modules.CachePopulationMixin,
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, EmbeddingBagCollectionContext],
    FusedOptimizerModule,
):
    """Sharded :class:`~torchrec_tt.modules.TTEmbeddingBagCollection`, table-wise and data-parallel.

    A ``table_wise`` table lives on one rank (``ParameterSharding.ranks[0]``); a
    ``data_parallel`` table on every rank, which computes its own batch's lookups (no
    all-to-all) and averages the core gradients with the other ranks in one bucketed
    all-reduce per backward before its in-backward optimizer steps, so cores and
    optimizer state stay identical on every rank (data-parallel tables need a fused
    optimizer: ``fused_params`` or ``apply_optimizer_in_backward``). Inputs are
    data-parallel KJTs, outputs data-parallel ``KeyedTensor``s keyed in the unsharded
    module's order. The local cores appear under their unsharded names
    (``embedding_bags.<table>.cores.<k>``) in ``named_parameters()`` and in
    ``fused_optimizer``; gradients of the cores arrive through TorchRec's pooled
    all-to-all, which divides them by the world size (as for TorchRec's own tables).

    With the unsharded module's ``validate_inputs=True`` (the default) every rank checks
    the ids it *sends*, before the input all-to-all, and raises ``ValueError`` naming the
    table, the feature and the bad value (:func:`torchrec_tt.modules.validate_lookups`);
    the owning rank does not check again. A rank that raises there never enters the
    collective, so the other ranks wait in it: under ``torchrun`` the elastic agent then
    stops them (docs/design.md, section 6). ``validate_inputs=False`` skips these checks
    (the op then rejects only ids beyond ``prod(tt_p_shapes)``, on the owning rank).

    Tables with a hot-row cache (docs/design.md, section 10): ``start_cache_warmup()`` and
    ``populate_cache()`` act on this rank's tables (the owner counts every rank's ids), with
    no collective; the fused optimizer's per-row state moves with the cached rows.

    Args:
        module (TTEmbeddingBagCollection): the unsharded module; materialized cores of the
            tables this rank owns are copied.
        table_name_to_parameter_sharding (Dict[str, ParameterSharding]): the plan.
        env (ShardingEnv): the sharding environment.
        fused_params (Optional[Dict[str, Any]]): the sharder's fused params (optimizer).
        device (Optional[torch.device]): compute device.
        qcomm_codecs_registry (Optional[Dict[str, QuantizedCommCodecs]]): comm codecs.
    """

    def __init__(
        self,
        module: TTEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._env = env
        self._pg: Optional[dist.ProcessGroup] = env.process_group
        self._device = device
        self._table_configs: List[TTEmbeddingBagConfig] = module.embedding_bag_configs()
        self._is_weighted: bool = module.is_weighted()
        self._validate_inputs: bool = bool(getattr(module, "_validate_inputs", True))
        self._feature_table: Dict[str, TTEmbeddingBagConfig] = {
            f: t for t in self._table_configs for f in t.feature_names
        }
        self._owner: Dict[str, int] = {}  # table-wise tables only
        self._sharding_type: Dict[str, str] = {}
        infos: Dict[str, List[EmbeddingShardingInfo]] = {t: [] for t in TT_SHARDING_TYPES}
        for table in self._table_configs:
            sharding = table_name_to_parameter_sharding.get(table.name)
            if sharding is None:
                raise ValueError(f"table '{table.name}' has no entry in the sharding plan")
            if sharding.sharding_type not in TT_SHARDING_TYPES or sharding.compute_kernel != TT_COMPUTE_KERNEL.value:
                raise ValueError(
                    f"table '{table.name}': sharding ({sharding.sharding_type!r}, {sharding.compute_kernel!r}) is not "
                    f"supported, TT tables take sharding types {list(TT_SHARDING_TYPES)} with {TT_COMPUTE_KERNEL.value!r}"
                )
            table_params = table_fused_params(module.embedding_bags[table.name], fused_params)
            if sharding.sharding_type == ShardingType.DATA_PARALLEL.value and "optimizer" not in table_params:
                raise ValueError(
                    f"table '{table.name}': a data_parallel TT table needs a fused optimizer (the sharder's "
                    f"fused_params['optimizer'] or apply_optimizer_in_backward on its cores), got none"
                )
            self._sharding_type[table.name] = sharding.sharding_type
            if sharding.sharding_type == ShardingType.TABLE_WISE.value:
                self._owner[table.name] = sharding.ranks[0]
            infos[sharding.sharding_type].append(
                EmbeddingShardingInfo(
                    embedding_config=EmbeddingTableConfig(
                        num_embeddings=table.num_embeddings,
                        embedding_dim=table.embedding_dim,
                        name=table.name,
                        data_type=table.data_type,
                        feature_names=list(table.feature_names),
                        pooling=table.pooling,
                        is_weighted=self._is_weighted,
                        embedding_names=list(table.feature_names),
                        weight_init_max=table.weight_init_max,
                        weight_init_min=table.weight_init_min,
                    ),
                    param_sharding=sharding,
                    param=torch.empty(table.num_embeddings, table.embedding_dim, device="meta"),
                    fused_params=table_params,
                )
            )
        # One TorchRec sharding per sharding type present: table-wise, then data-parallel.
        self._shardings: List[EmbeddingSharding] = []
        for sharding_type in TT_SHARDING_TYPES:
            if infos[sharding_type]:
                sharding_class = _SHARDING_CLASSES[sharding_type]
                kwargs = {"qcomm_codecs_registry": self.qcomm_codecs_registry} if sharding_type == ShardingType.TABLE_WISE.value else {}
                self._shardings.append(sharding_class(infos[sharding_type], env, device, **kwargs))
        lookups = [sharding.create_lookup(device=device) for sharding in self._shardings]
        kernels: List[TTEmbeddingBagKernel] = [k for lookup in lookups for k in lookup._emb_modules]
        # Registered before the lookups so that the local cores are named
        # "embedding_bags.<table>.cores.<k>" (module traversal keeps the first path).
        self.embedding_bags = nn.ModuleDict({n: b for k in kernels for n, b in k.embedding_bags.items()})
        self._lookups = nn.ModuleList(lookups)
        self._input_dists = [sharding.create_input_dist() for sharding in self._shardings]
        self._output_dists = [sharding.create_output_dist(device=device) for sharding in self._shardings]
        self._optim: KeyedOptimizer = CombinedOptimizer([k.fused_optimizer for k in kernels])

        # Features arrive sharding after sharding, rank-major within table-wise; outputs go
        # back in the unsharded module's order.
        self._feature_splits: List[int] = [len(sharding.feature_names()) for sharding in self._shardings]
        self._sharded_feature_names: List[str] = [f for sharding in self._shardings for f in sharding.feature_names()]
        self._sharded_names: List[str] = [n for sharding in self._shardings for n in sharding.embedding_names()]
        self._sharded_dims: List[int] = [d for sharding in self._shardings for d in sharding.embedding_dims()]
        self._embedding_names: List[str] = [f for t in self._table_configs for f in t.feature_names]
        self._embedding_dims: List[int] = [t.embedding_dim for t in self._table_configs for _ in t.feature_names]
        self._output_order: List[int] = [self._sharded_names.index(n) for n in self._embedding_names]
        self._reorder_output: bool = self._output_order != sorted(self._output_order)
        self._input_keys: Optional[Tuple[str, ...]] = None
        self._input_order: List[int] = []
        self._permute_input: bool = True
        self.copy_cores_from(module)

    # ---------------------------------------------------------------- forward path
    def create_context(self) -> EmbeddingBagCollectionContext:
        return EmbeddingBagCollectionContext()

    def input_dist(self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        if features.variable_stride_per_key():
            raise ValueError("TT tables do not support a variable batch size per feature")
        keys = tuple(features.keys())
        if keys != self._input_keys:
            missing = [f for f in self._sharded_feature_names if f not in keys]
            if missing:
                raise ValueError(f"features {missing} of the TT tables are missing from the input (got {list(keys)})")
            self._input_order = [keys.index(f) for f in self._sharded_feature_names]
            self._permute_input = self._input_order != list(range(len(keys)))
            self._input_keys = keys
        with torch.no_grad():
            if self._permute_input:
                features = features.permute(self._input_order)
            if self._validate_inputs:
                self._validate(features)
            parts = features.split(self._feature_splits) if len(self._shardings) > 1 else [features]
            awaitables = []
            for input_dist, part in zip(self._input_dists, parts):
                ctx.sharding_contexts.append(
                    EmbeddingShardingContext(
                        batch_size_per_feature_pre_a2a=part.stride_per_key(),
                        variable_batch_per_feature=False,
                    )
                )
                awaitables.append(input_dist(part))
            return KJTListSplitsAwaitable(awaitables, ctx)

    def _validate(self, features: KeyedJaggedTensor) -> None:
        """Check the ids this rank sends (the TT features, in sharding order) before the
        all-to-all: ``ValueError`` naming the table, the feature and the bad value."""
        for name, jt in features.to_dict().items():
            tt_modules.validate_lookups(self._feature_table[name], name, jt.values(), jt.lengths(), jt.weights_or_none())

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        return [lookup(features) for lookup, features in zip(self._lookups, dist_input)]

    def output_dist(self, ctx: EmbeddingBagCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitable = EmbeddingBagCollectionAwaitable(
            awaitables=[
                dist(out, sharding_ctx) for dist, out, sharding_ctx in zip(self._output_dists, output, ctx.sharding_contexts)
            ],
            embedding_dims=self._sharded_dims,
            embedding_names=self._sharded_names,
        )
        awaitable.callbacks.append(self._to_unsharded_order)
        return awaitable

    def _to_unsharded_order(self, kt: KeyedTensor) -> KeyedTensor:
        values = kt.values()
        if self._reorder_output:
            columns = values.split(self._sharded_dims, dim=1)
            values = torch.cat([columns[i] for i in self._output_order], dim=1)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._embedding_dims, values=values)

    # ---------------------------------------------------------------- parameters & optimizer
    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    @property
    def unsharded_module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def embedding_bag_configs(self) -> List[TTEmbeddingBagConfig]:
        return self._table_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def owner(self, table_name: str) -> int:
        """Rank (in the sharding process group) that holds the table-wise table ``table_name``."""
        return self._owner[table_name]

    def sharding_type(self, table_name: str) -> str:
        """``"table_wise"`` or ``"data_parallel"``: how ``table_name`` is sharded."""
        return self._sharding_type[table_name]

    def _core_keys(self, table: TTEmbeddingBagConfig) -> List[str]:
        """State keys of a table: its cores, then (with a cache) ``cache_weight`` and ``cache_ids``."""
        cache = ["cache_weight", "cache_ids"] if table.cache_rows > 0 else []
        return [f"embedding_bags.{table.name}.cores.{k}" for k in range(table.num_cores)] + [
            f"embedding_bags.{table.name}.{name}" for name in cache
        ]

    @staticmethod
    def _state_tensors(bag: TTEmbeddingBag) -> List[torch.Tensor]:
        """A table's tensors in :meth:`_core_keys` order."""
        cache = [bag.cache_weight, bag.cache_ids] if bag.config.cache_rows > 0 else []
        return list(bag.cores) + cache

    @staticmethod
    def _state_shapes(table: TTEmbeddingBagConfig) -> List[Tuple[int, ...]]:
        cache = [(table.cache_rows, table.embedding_dim), (table.cache_rows,)] if table.cache_rows > 0 else []
        return [tuple(s) for s in table.core_shapes] + cache

    @torch.no_grad()
    def copy_cores_from(self, module: TTEmbeddingBagCollection) -> None:
        """Copy the cores (and cache) of the locally owned tables from an unsharded module (if materialized)."""
        for name, bag in self.embedding_bags.items():
            for dst, src in zip(self._state_tensors(bag), self._state_tensors(module.embedding_bags[name])):
                if src.device.type != "meta" and dst.device.type != "meta":
                    dst.copy_(src)

    def _known_table(self, table: str) -> bool:
        return table in self._sharding_type

    def populate_cache(
        self,
        table: Optional[str] = None,
        ids: Optional[torch.Tensor] = None,
        counts: Optional[torch.Tensor] = None,
        on_evict: str = "write_back",
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> Dict[str, CacheUpdate]:
        """Fill the caches of this rank's tables (see ``CachePopulationMixin.populate_cache``).

        Table-wise tables: the owner counted every rank's ids, no collective. Data-parallel
        tables are replicas: from warm-up counts, the counts are first summed over the ranks
        (a collective: call on every rank), so every replica caches the same rows; ``ids=`` or
        ``counts=`` for a data-parallel table must be the same on every rank.
        """
        if ids is None and counts is None and self._env.world_size > 1:
            for name in sorted(self._sharding_type):
                bag = self.embedding_bags[name] if name in self.embedding_bags else None
                if (
                    (table is None or table == name)
                    and self._sharding_type[name] == ShardingType.DATA_PARALLEL.value
                    and bag is not None
                    and bag.cache_counts is not None
                ):
                    dist.all_reduce(bag.cache_counts, group=self._pg)
        return super().populate_cache(table, ids=ids, counts=counts, on_evict=on_evict, optimizer=optimizer)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(
        self,
        destination: Optional[Dict[str, Any]] = None,
        prefix: str = "",
        keep_vars: bool = False,
    ) -> Dict[str, Any]:
        """Every table's cores under unsharded keys, on every rank (collective)."""
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()  # pyre-ignore[16]
        for table in self._table_configs:
            for key, core in zip(self._core_keys(table), self._broadcast_table(table, keep_vars)):
                destination[prefix + key] = core
        return destination

    def _is_local(self, table_name: str) -> bool:
        return table_name in self.embedding_bags

    def _broadcast_table(self, table: TTEmbeddingBagConfig, keep_vars: bool) -> List[torch.Tensor]:
        # Float tensors (cores, cached rows) travel as one fp32 buffer, the cache ids as int64.
        shapes = self._state_shapes(table)
        num_float = table.num_cores + (1 if table.cache_rows > 0 else 0)
        if self._is_local(table.name):
            tensors = self._state_tensors(self.embedding_bags[table.name])
            local = tensors if keep_vars else [t.detach() for t in tensors]
            if self._env.world_size == 1 or table.name not in self._owner:  # data-parallel: same everywhere
                return local
                return local
            flat = torch.cat([t.detach().float().reshape(-1) for t in tensors[:num_float]])
            ids = tensors[num_float:]
        else:
            numel = sum(torch.Size(s).numel() for s in shapes[:num_float])
            flat = torch.empty(numel, dtype=torch.float32, device=self._state_device())
            ids = [torch.empty(s, dtype=torch.int64, device=self._state_device()) for s in shapes[num_float:]]
        src = dist.get_global_rank(self._pg, self._owner[table.name])
        dist.broadcast(flat, src=src, group=self._pg)
        for t in ids:
            dist.broadcast(t, src=src, group=self._pg)
        if self._is_local(table.name):
            return local
        float_shapes = shapes[:num_float]
        parts = flat.split([torch.Size(s).numel() for s in float_shapes])
        return [part.view(shape) for part, shape in zip(parts, float_shapes)] + ids

    def _state_device(self) -> torch.device:
        if self._device is not None and self._device.type != "meta":
            return self._device
        return torch.device("cpu")

    def load_state_dict(  # pyre-ignore[14]
        self,
        state_dict: Mapping[str, Any],
        strict: bool = True,
        assign: bool = False,
    ) -> _IncompatibleKeys:
        """Load unsharded keys (any world size's checkpoint); each rank keeps its tables."""
        missing, expected = [], set()
        with torch.no_grad():
            for table in self._table_configs:
                for k, key in enumerate(self._core_keys(table)):
                    expected.add(key)
                    if key not in state_dict:
                        missing.append(key)
                    elif self._is_local(table.name):
                        core = self._state_tensors(self.embedding_bags[table.name])[k]
                        value = state_dict[key]
                        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(core.shape):
                            raise ValueError(
                                f"'{key}': expected a tensor of shape {tuple(core.shape)}, got "
                                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
                            )
                        core.copy_(value)
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}"
            )
        return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)

    def optimizer_state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Optimizer state of every table's cores, by unsharded key, on every rank (collective).

        Returns ``{"embedding_bags.<table>.cores.<k>": {name: value}}`` with host copies
        of the state tensors; empty dicts for cores whose optimizer has not stepped yet.
        """
        local: Dict[str, Dict[str, Any]] = {}
        for optimizer in self._kernel_optimizers():
            state_dict = optimizer.state_dict()["state"]
            for key in optimizer.params:
                local[key] = {
                    n: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                    for n, v in state_dict.get(key, {}).items()
                }
        if self._env.world_size == 1:
            return local
        gathered: List[Optional[Dict[str, Dict[str, Any]]]] = [None] * self._env.world_size
        dist.all_gather_object(gathered, local, group=self._pg)
        return {k: v for part in gathered for k, v in (part or {}).items()}

    def load_optimizer_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Load :meth:`optimizer_state_dict` output (any world size) into the local optimizers."""
        for optimizer in self._kernel_optimizers():
            optimizer.load_state_dict({"state": {key: state[key] for key in optimizer.params if key in state}})

    def _kernel_optimizers(self) -> Iterator[KeyedOptimizer]:
        for kernel in (k for lookup in self._lookups for k in lookup._emb_modules):
            if len(kernel.fused_optimizer.params) > 0:
                yield kernel.fused_optimizer
