"""Table-wise sharded :class:`~torchrec_tt.modules.TTEmbeddingBagCollection`.

Built on TorchRec's table-wise parts (``TwPooledEmbeddingSharding``, its KJT and pooled
all-to-alls, ``GroupedPooledEmbeddingsLookup``) with the TT kernel plugged in under
``EmbeddingComputeKernel.CUSTOMIZED_KERNEL``. TorchRec leaves state-dict handling of such
tables to the module, so this one produces and accepts the unsharded keys
``embedding_bags.<table>.cores.<k>`` itself: ``state_dict()`` broadcasts every core from
its owning rank (a collective: call it on all ranks), so every rank holds the whole
table set and a checkpoint loads at any world size and into the unsharded module.
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
from torchrec_tt.modules import TTEmbeddingBag, TTEmbeddingBagCollection

TT_COMPUTE_KERNEL = EmbeddingComputeKernel.CUSTOMIZED_KERNEL


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
        return TTEmbeddingBagKernel(config, pg=pg, device=device)


class TTTwPooledEmbeddingSharding(TwPooledEmbeddingSharding):
    """Table-wise sharding of TT tables: TorchRec's, with the TT lookup."""

    def create_lookup(
        self,
        device: Optional[torch.device] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        feature_processor: Optional[BaseGroupedFeatureProcessor] = None,
    ) -> BaseEmbeddingLookup:
        return TTGroupedPooledEmbeddingsLookup(
            grouped_configs=self._grouped_embedding_configs,
            device=device if device is not None else self._device,
            pg=self._pg,
            feature_processor=feature_processor,
            sharding_type=ShardingType.TABLE_WISE,
            env=self._env,
        )


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
    """Table-wise sharded :class:`~torchrec_tt.modules.TTEmbeddingBagCollection`.

    Each table lives on one rank (``ParameterSharding.ranks[0]``). Inputs are
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

    Tables with a hot-row cache (docs/design.md, section 9): ``start_cache_warmup()`` and
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
        self._owner: Dict[str, int] = {}
        infos = []
        for table in self._table_configs:
            sharding = table_name_to_parameter_sharding.get(table.name)
            if sharding is None:
                raise ValueError(f"table '{table.name}' has no entry in the sharding plan")
            if sharding.sharding_type != ShardingType.TABLE_WISE.value or sharding.compute_kernel != TT_COMPUTE_KERNEL.value:
                raise ValueError(
                    f"table '{table.name}': sharding ({sharding.sharding_type!r}, {sharding.compute_kernel!r}) is not "
                    f"supported, TT tables take ({ShardingType.TABLE_WISE.value!r}, {TT_COMPUTE_KERNEL.value!r})"
                )
            self._owner[table.name] = sharding.ranks[0]
            infos.append(
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
                    fused_params=table_fused_params(module.embedding_bags[table.name], fused_params),
                )
            )
        self._sharding = TTTwPooledEmbeddingSharding(infos, env, device, qcomm_codecs_registry=self.qcomm_codecs_registry)
        lookup = self._sharding.create_lookup(device=device)
        kernels: List[TTEmbeddingBagKernel] = list(lookup._emb_modules)
        # Registered before the lookup so that the local cores are named
        # "embedding_bags.<table>.cores.<k>" (module traversal keeps the first path).
        self.embedding_bags = nn.ModuleDict({n: b for k in kernels for n, b in k.embedding_bags.items()})
        self._lookup = lookup
        self._lookups = [lookup]
        self._input_dist = self._sharding.create_input_dist()
        self._output_dist = self._sharding.create_output_dist(device=device)
        self._optim: KeyedOptimizer = CombinedOptimizer([k.fused_optimizer for k in kernels])

        # Features arrive rank-major (the order of the sharding); outputs go back in the
        # unsharded module's order.
        self._sharded_feature_names: List[str] = self._sharding.feature_names()
        self._sharded_names: List[str] = self._sharding.embedding_names()
        self._sharded_dims: List[int] = self._sharding.embedding_dims()
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
            ctx.sharding_contexts.append(
                EmbeddingShardingContext(
                    batch_size_per_feature_pre_a2a=features.stride_per_key(),
                    variable_batch_per_feature=False,
                )
            )
            return KJTListSplitsAwaitable([self._input_dist(features)], ctx)

    def _validate(self, features: KeyedJaggedTensor) -> None:
        """Check the ids this rank sends (the TT features, in sharding order) before the
        all-to-all: ``ValueError`` naming the table, the feature and the bad value."""
        for name, jt in features.to_dict().items():
            tt_modules.validate_lookups(self._feature_table[name], name, jt.values(), jt.lengths(), jt.weights_or_none())

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        return [self._lookup(dist_input[0])]

    def output_dist(self, ctx: EmbeddingBagCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitable = EmbeddingBagCollectionAwaitable(
            awaitables=[self._output_dist(output[0], ctx.sharding_contexts[0])],
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
        """Rank (in the sharding process group) that holds ``table_name``."""
        return self._owner[table_name]

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
        # populate_cache (CachePopulationMixin) acts on the local tables only: no collective.
        return table in self._owner

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
            if self._env.world_size == 1:
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
        for kernel in self._lookup._emb_modules:
            if len(kernel.fused_optimizer.params) > 0:
                yield kernel.fused_optimizer
