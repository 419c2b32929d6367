"""TT-compressed embedding-bag modules with TorchRec ``EmbeddingBagCollection`` semantics."""

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt import _python_ops
from torchrec_tt.cache import (
    EVICTION_POLICIES,
    CacheUpdate,
    cache_hits,
    cached_tt_embedding_bag,
    empty_cache_ids,
    top_rows,
    tt_rows,
    write_back_last_core,
)
from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.enums import PoolingMode
from torchrec_tt.init import from_dense, tt_to_dense, uniform_like_init_
from torchrec_tt.ops import tt_embedding_bag

_INDEX_DTYPES = (torch.int32, torch.int64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STORAGE_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}

# Calls recorded as single nodes by ``torch.fx.symbolic_trace`` / ``torchrec.fx.symbolic_trace``
# (their bodies branch on values and keys); Dynamo and ``torch.export`` trace through them.
torch.fx.wrap("tt_embedding_bag")
torch.fx.wrap("cached_tt_embedding_bag")


class _TableInfo(NamedTuple):
    """What validation needs of a table, as plain values (an fx graph can hold it)."""

    name: str
    num_embeddings: int
    feature_names: Tuple[str, ...]


def _where(config: TTEmbeddingBagConfig, feature: str) -> str:
    return f"table '{config.name}', feature '{feature}'"


def validate_lookups(
    config: TTEmbeddingBagConfig,
    feature: str,
    indices: torch.Tensor,
    lengths: torch.Tensor,
    weights: Optional[torch.Tensor],
) -> None:
    """Raise ``ValueError`` naming the table, feature and bad value of an invalid batch.

    Checks dtypes and shapes; and, except on ``meta`` tensors, the values: lengths
    non-negative and summing to the number of ids, ids in ``[0, num_embeddings)`` (not
    the padding rows up to ``prod(tt_p_shapes)``), finite weights. Reads values on the
    host, so on CUDA it synchronizes; modules skip it when built with
    ``validate_inputs=False``.
    """
    where = _where(config, feature)
    for name, t in (("ids", indices), ("lengths", lengths)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{where}: {name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{where}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if weights is not None:
        if not weights.is_floating_point():
            raise ValueError(f"{where}: per-sample weights must be floating point, got {weights.dtype}")
        if weights.shape != indices.shape:
            raise ValueError(f"{where}: per-sample weights must have the ids' shape {tuple(indices.shape)}, got {tuple(weights.shape)}")
    if not _python_ops.reads_values(indices, lengths, weights):
        return
    bad = _python_ops.first_out_of_range(lengths, 0, None)
    if bad is not None:
        raise ValueError(f"{where}: lengths must be >= 0, but bag {bad[0]} has length {bad[1]}")
    total = int(lengths.sum())
    if total != indices.numel():
        raise ValueError(f"{where}: lengths must sum to the number of ids ({indices.numel()}), got {total}")
    bad = _python_ops.first_out_of_range(indices, 0, config.num_embeddings)
    if bad is not None:
        raise ValueError(f"{where}: ids must be in [0, {config.num_embeddings}), got index {bad[1]} at position {bad[0]}")
    if weights is not None:
        bad = _python_ops.first_non_finite(weights)
        if bad is not None:
            raise ValueError(f"{where}: per-sample weights must be finite, got {bad[1]} at position {bad[0]}")


def validate_features(
    features: KeyedJaggedTensor,
    config_of: Dict[str, TTEmbeddingBagConfig],
    is_weighted: bool,
    read_values: bool,
) -> None:
    """Check a whole KJT before it is permuted and split (names the table and the feature).

    Keys distinct and known shapes (values/weights 1-D, weights given when ``is_weighted``)
    always; lengths summing to the number of values and weights, when ``read_values``.
    Features of no table are ignored (``EmbeddingBagCollection`` semantics).
    """
    keys = list(features.keys())

    def where(feature: str) -> str:
        config = config_of.get(feature)
        return _where(config, feature) if config is not None else f"feature '{feature}' (no table)"

    first = next((k for k in keys if k in config_of), keys[0] if keys else "")
    for position, key in enumerate(keys):
        if key in keys[:position]:
            raise ValueError(f"{where(key)}: KJT keys must be distinct, got '{key}' at positions {keys.index(key)} and {position}")
    values, weights = features.values(), features.weights_or_none()
    if values.dim() != 1:
        raise ValueError(f"{where(first)}: KJT values must be 1-D, got shape {tuple(values.shape)}")
    if values.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{where(first)}: KJT values (ids) must be int32 or int64, got {values.dtype}")
    if weights is not None and weights.dim() != 1:
        raise ValueError(f"{where(first)}: KJT weights must be 1-D, got shape {tuple(weights.shape)}")
    if is_weighted and weights is None:
        raise ValueError(f"{where(first)}: the module is weighted (is_weighted=True), but the KJT has no weights, got None")
    if is_weighted and not weights.is_floating_point():
        raise ValueError(f"{where(first)}: per-sample weights must be floating point, got {weights.dtype}")
    lengths = features.lengths()
    if lengths.dim() != 1:
        raise ValueError(f"{where(first)}: KJT lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if not keys or not read_values or not _python_ops.reads_values(lengths):
        return
    if lengths.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{where(first)}: KJT lengths must be int32 or int64, got {lengths.dtype}")
    strides = features.stride_per_key() if features.variable_stride_per_key() else [features.stride()] * len(keys)
    if lengths.numel() != sum(strides):
        raise ValueError(f"{where(first)}: KJT lengths must have one entry per key and sample ({sum(strides)}), got {lengths.numel()}")
    per_key = lengths.split(strides)
    for key, key_lengths in zip(keys, per_key):
        bad = _python_ops.first_out_of_range(key_lengths, 0, None)
        if bad is not None:
            raise ValueError(f"{where(key)}: lengths must be >= 0, but bag {bad[0]} has length {bad[1]}")
    sums = [int(t.sum()) for t in per_key]
    for name, count in (("values", values.numel()), ("weights", None if weights is None else weights.numel())):
        if count is None:
            continue
        cumulative = 0
        for key, n in zip(keys, sums):
            cumulative += n
            if cumulative > count:
                raise ValueError(
                    f"{where(key)}: KJT lengths through this feature must sum to at most the number of {name} ({count}), got {cumulative}"
                )
        if cumulative != count:
            raise ValueError(f"{where(keys[-1])}: KJT lengths must sum to the number of {name} ({count}), got {cumulative}")


def _table_lookups(
    config: "TTEmbeddingBagConfig | _TableInfo",
    features: KeyedJaggedTensor,
    is_weighted: bool,
    validate: bool,
    dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(ids, offsets, weights)`` of one table's KJT (its features, config order), checked."""
    if features.variable_stride_per_key():
        raise ValueError(f"table '{config.name}': a variable batch size per feature is not supported")
    validate_features(features, {f: config for f in config.feature_names}, is_weighted, validate)
    weights = features.weights().to(dtype) if is_weighted else None
    if validate and _python_ops.reads_values(features.lengths()):
        # Per feature (validate_features checked that the lengths cover the values), with the
        # weights after the cast to the cores' dtype (a float64 weight can overflow to inf).
        keys, values = features.keys(), features.values()
        per_key = features.lengths().split([features.stride()] * len(keys))
        sums = [int(n.sum()) for n in per_key]
        per_key_weights = weights.split(sums) if weights is not None else [None] * len(keys)
        for name, lengths, ids, w in zip(keys, per_key, values.split(sums), per_key_weights):
            validate_lookups(config, name, ids, lengths, w)
    return features.values(), features.offsets(), weights


def _side_by_side(pooled: torch.Tensor, num_features: int, batch: int, dim: int) -> torch.Tensor:
    """``(F * B, D)`` feature-major -> ``(B, F * D)``."""
    if num_features == 1:
        return pooled
    # explicit sizes: B = 0 leaves -1 ambiguous
    return pooled.view(num_features, batch, dim).transpose(0, 1).reshape(batch, num_features * dim)


def _missing_features_error(config_of: Dict[str, "TTEmbeddingBagConfig | _TableInfo"], names: Sequence[str], keys: Sequence[str]) -> Optional[ValueError]:
    missing = [f for f in names if f not in keys]
    if not missing:
        return None
    return ValueError(
        f"{_where(config_of[missing[0]], missing[0])}: the input KJT must have every table's "
        f"features, {missing} are missing, got keys {list(keys)}"
    )


def _collection_lookups(
    features: KeyedJaggedTensor,
    tables: Tuple[_TableInfo, ...],
    is_weighted: bool,
    validate: bool,
    dtype: torch.dtype,
) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], int]:
    """Eager: checks the KJT, puts it in table order and splits it: per table ``(ids, offsets,
    weights)``, and the batch size. Reads lengths on the host (KJT permute/split)."""
    config_of = {f: t for t in tables for f in t.feature_names}
    names = [f for t in tables for f in t.feature_names]
    validate_features(features, config_of, is_weighted, validate)
    keys = features.keys()
    if keys != names:
        error = _missing_features_error(config_of, names, keys)
        if error is not None:
            raise error
        features = features.permute([keys.index(f) for f in names])
    splits = features.split([len(t.feature_names) for t in tables])
    return [_table_lookups(t, kjt, is_weighted, validate, dtype) for t, kjt in zip(tables, splits)], features.stride()


@torch.fx.wrap
def _collection_lookups_fx(
    keys: List[str],
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: Optional[torch.Tensor],
    tables: Tuple[_TableInfo, ...],
    is_weighted: bool,
    validate: bool,
    dtype: torch.dtype,
) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], int]:
    """:func:`_collection_lookups` as one node of an fx graph (runs eagerly, checks included)."""
    features = KeyedJaggedTensor(keys=keys, values=values, weights=weights, lengths=lengths)
    return _collection_lookups(features, tables, is_weighted, validate, dtype)


def _collection_lookups_traced(
    features: KeyedJaggedTensor,
    tables: Tuple[_TableInfo, ...],
    is_weighted: bool,
    dtype: torch.dtype,
) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], List[int]]], int]:
    """``torch.compile``/``torch.export``: no host reads, no data-dependent sizes.

    Every table sees the whole batch (all ``F * B`` bags) with the ids of other tables'
    features replaced by row 0; its own features' bags are then selected by position. With
    ``grt`` those foreign lookups fall into one group per bag (group 0), so they cost one
    short chain per foreign bag; with ``tt`` one chain per foreign lookup. Shapes and dtypes
    are checked here (at trace time); ids, lengths and weights are checked by the ops when the
    graph runs (ids against the padded row count ``prod(tt_p_shapes)``).
    """
    config_of = {f: t for t in tables for f in t.feature_names}
    names = [f for t in tables for f in t.feature_names]
    validate_features(features, config_of, is_weighted, read_values=False)
    keys = features.keys()
    error = _missing_features_error(config_of, names, keys)
    if error is not None:
        raise error
    values, lengths = features.values(), features.lengths()
    num_keys = len(keys)
    batch = lengths.shape[0] // num_keys
    offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(values.dtype)
    weights = features.weights().to(dtype) if is_weighted else None
    positions = torch.arange(values.shape[0], device=values.device, dtype=values.dtype)
    out = []
    for table in tables:
        slots = [keys.index(f) for f in table.feature_names]
        mask = torch.zeros_like(positions, dtype=torch.bool)
        for k in slots:
            mask = mask | ((positions >= offsets[k * batch]) & (positions < offsets[(k + 1) * batch]))
        ids = values if len(tables) == 1 and len(slots) == num_keys else torch.where(mask, values, torch.zeros_like(values))
        out.append((ids, offsets, weights, slots))
    return out, batch


class TTEmbeddingBag(nn.Module):
    """One TT-compressed table; pooled lookups like ``nn.EmbeddingBag``.

    Args:
        config (TTEmbeddingBagConfig): the table.
        device (Optional[torch.device]): where to allocate the cores (``meta`` allowed).
        validate_inputs (bool): ``forward`` checks that ids lie in ``[0, num_embeddings)``
            (the op itself accepts the padding rows up to ``prod(tt_p_shapes)``) and that
            weights are finite, raising ``ValueError`` naming the table (a host sync on CUDA).

    Attributes:
        cores (nn.ParameterList): core ``k`` of shape ``(m_k, R[k], n_k, R[k+1])``.
        cache_weight (nn.Parameter): ``(K, embedding_dim)`` cached rows, only when
            ``config.cache_rows = K > 0`` (docs/design.md, section 10).
        cache_ids (Tensor): ``(K,)`` sorted int64 buffer, the row of every cache slot
            (one of the largest int64 values for an empty slot), only when ``K > 0``.
    """

    def __init__(
        self,
        config: TTEmbeddingBagConfig,
        device: Optional[torch.device] = None,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(config, TTEmbeddingBagConfig):
            raise ValueError(f"TTEmbeddingBag: config must be a TTEmbeddingBagConfig, got {type(config).__name__}")
        self.config = config
        self.validate_inputs = validate_inputs
        # The op's enums, converted once (the config keeps TorchRec's PoolingType).
        self._pooling = PoolingMode.parse(config.pooling, f"table '{config.name}'")
        # FP16/BF16 tables store their cores in that dtype (half the bytes) and compute in fp32.
        dtype = _STORAGE_DTYPES[config.data_type]
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, dtype=dtype, device=device)) for shape in config.core_shapes]
        )
        # Warm-up access counts ((num_embeddings,) int64), only between start_cache_warmup()
        # and populate_cache(): temporary, never in the state dict.
        self._cache_counts: Optional[torch.Tensor] = None
        if config.cache_rows > 0:
            self.cache_weight = nn.Parameter(torch.zeros(config.cache_rows, config.embedding_dim, dtype=dtype, device=device))
            self.register_buffer("cache_ids", empty_cache_ids(config.cache_rows, device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows with the mean and variance of TorchRec's ``U(weight_init_min, weight_init_max)``
        init (:func:`~torchrec_tt.init.uniform_like_init_`)."""
        if self.cores[0].device.type == "meta":
            return
        lo, hi = self.config.get_weight_init_min(), self.config.get_weight_init_max()
        if self.cores[0].dtype in _LOW_PRECISION:
            full = [torch.empty(c.shape, dtype=torch.float32, device=c.device) for c in self.cores]
            uniform_like_init_(full, lo, hi)
            with torch.no_grad():
                for core, value in zip(self.cores, full):
                    core.copy_(value)
        else:
            uniform_like_init_(list(self.cores), lo, hi)
        self._refresh_cache()

    @torch.no_grad()
    def _refresh_cache(self, dense: Optional[torch.Tensor] = None) -> None:
        """Cached rows set to their TT value (or to ``dense``'s rows); empty slots to 0."""
        if self.config.cache_rows == 0:
            return
        valid = self.cache_ids < self.config.num_embeddings
        ids = self.cache_ids[valid]
        rows = dense[ids] if dense is not None else tt_rows(self.compute_cores(), ids, self.config.tt_p_shapes)
        self.cache_weight.zero_()
        self.cache_weight[valid] = rows.to(self.cache_weight.dtype)

    def compute_cores(self) -> List[torch.Tensor]:
        """The cores the op runs on: fp16/bf16 cores upcast to fp32 (small; gradients flow back
        to the low-precision parameters), others as they are."""
        cores = self._core_list()
        if cores[0].dtype in _LOW_PRECISION:  # the parameters themselves (_core_list): no fx proxy
            return [c.float() for c in cores]
        return cores

    def _core_list(self) -> List[torch.Tensor]:
        # The parameters themselves: iterating the ParameterList cost 7 us a call, a third of the
        # module's Python time per lookup call. Under fx symbolic tracing they become get_attr
        # nodes all the same.
        return list(self.cores._parameters.values())

    def _storage_dtype(self) -> torch.dtype:
        # The parameter itself, not through ``self.cores[0]`` (an fx proxy under symbolic tracing).
        return next(iter(self.cores._parameters.values())).dtype

    def compute_dtype(self) -> torch.dtype:
        """dtype of the lookups' arithmetic, outputs and per-sample weights."""
        dtype = self._storage_dtype()
        return torch.float32 if dtype in _LOW_PRECISION else dtype

    def forward(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``(L,)`` indices, ``(B + 1,)`` offsets -> ``(B, embedding_dim)``."""
        if self.validate_inputs:
            self._validate_bag_inputs(indices, offsets, per_sample_weights)
        return self._pool(indices, offsets, per_sample_weights)

    def _pool(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor],
    ) -> torch.Tensor:
        if self.config.cache_rows > 0:
            if self._cache_counts is not None and not _python_ops.is_tracing(indices):
                self._cache_counts.index_add_(0, indices.to(torch.int64), torch.ones_like(indices, dtype=torch.int64))
            # The parameter and the buffer themselves, as _core_list: Module.__getattr__ cost 2 us
            # each per call here, and fx traces them as get_attr nodes all the same.
            weight, cache_ids = self._parameters["cache_weight"], self._buffers["cache_ids"]
            return cached_tt_embedding_bag(
                self.compute_cores(),
                weight.float() if weight.dtype in _LOW_PRECISION else weight,  # the cores' dtype
                cache_ids,
                indices,
                offsets,
                per_sample_weights,
                self._pooling,
                self.config.variant,
                num_rows=self.config.num_embeddings,
            )
        return tt_embedding_bag(
            self.compute_cores(),
            indices,
            offsets,
            per_sample_weights,
            pooling=self._pooling,
            variant=self.config.variant,
        )

    def _validate_bag_inputs(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor],
    ) -> None:
        """Module-level checks of ``forward`` (the op checks shapes, offsets and ``prod(m)``)."""
        where = f"table '{self.config.name}'"
        if not isinstance(indices, torch.Tensor) or indices.dtype not in _INDEX_DTYPES:
            return  # the op names the argument and the dtype
        if _python_ops.reads_values(indices):
            bad = _python_ops.first_out_of_range(indices, 0, self.config.num_embeddings)
            if bad is not None:
                raise ValueError(
                    f"{where}: indices[{bad[0]}] must be in [0, num_embeddings={self.config.num_embeddings}), got {bad[1]}"
                )
        if isinstance(per_sample_weights, torch.Tensor) and per_sample_weights.is_floating_point():
            _python_ops.check_per_sample_weights_finite(where, per_sample_weights)

    def forward_features(self, features: KeyedJaggedTensor, is_weighted: bool, validate: bool) -> torch.Tensor:
        """Pool this table's features in one op call.

        Args:
            features (KeyedJaggedTensor): ``(F, B, L)``, exactly this table's features in
                config order.
            is_weighted (bool): use the KJT's weights as per-sample weights.
            validate (bool): check the batch first (:func:`validate_lookups`).

        Returns:
            Tensor: ``(B, F * embedding_dim)``, features side by side.
        """
        values, offsets, weights = _table_lookups(self.config, features, is_weighted, validate, self.compute_dtype())
        return _side_by_side(self._pool(values, offsets, weights), len(features.keys()), features.stride(), self.config.embedding_dim)

    def full_weight(self) -> torch.Tensor:
        """The materialized ``(num_embeddings, embedding_dim)`` table (no grad): the TT rows,
        with the cached rows read from the cache."""
        with torch.no_grad():
            dense = tt_to_dense(self.compute_cores(), self.config.num_embeddings)
            if self.config.cache_rows > 0:
                valid = self.cache_ids < self.config.num_embeddings
                dense[self.cache_ids[valid]] = self.cache_weight[valid].to(dense.dtype)
            return dense

    @torch.no_grad()
    def copy_from_dense(self, weight: torch.Tensor) -> None:
        """Set the cores to a TT-SVD of a dense ``(num_embeddings, embedding_dim)`` table."""
        expected = (self.config.num_embeddings, self.config.embedding_dim)
        if tuple(weight.shape) != expected:
            raise ValueError(f"table '{self.config.name}': weight has shape {tuple(weight.shape)}, expected {expected}")
        cores = from_dense(weight, self.config.tt_p_shapes, self.config.tt_q_shapes, self.config.tt_ranks)
        for param, core in zip(self.cores, cores):
            param.copy_(core)
        self._refresh_cache(weight)  # cached rows hold the given rows exactly

    # ---------------------------------------------------------------- hot-row cache
    def _check_cached(self, what: str) -> None:
        if self.config.cache_rows == 0:
            raise ValueError(f"table '{self.config.name}': {what} needs a cache, but cache_rows=0")

    def start_cache_warmup(self) -> None:
        """Count every looked-up id from now until :meth:`populate_cache` (a temporary
        ``(num_embeddings,)`` int64 counter, on the table's device)."""
        self._check_cached("start_cache_warmup")
        self._cache_counts = torch.zeros(self.config.num_embeddings, dtype=torch.int64, device=self.cache_ids.device)

    def stop_cache_warmup(self) -> Optional[torch.Tensor]:
        """Stop counting without populating; returns the counts (``None`` if not counting)."""
        counts, self._cache_counts = self._cache_counts, None
        return counts

    @property
    def cache_counts(self) -> Optional[torch.Tensor]:
        """``(num_embeddings,)`` warm-up access counts, or ``None`` outside a warm-up."""
        return self._cache_counts

    def cached_rows(self) -> torch.Tensor:
        """Sorted ids of the rows now in the cache (empty slots left out)."""
        self._check_cached("cached_rows")
        return self.cache_ids[self.cache_ids < self.config.num_embeddings]

    def _rows_to_cache(self, ids: Optional[torch.Tensor], counts: Optional[torch.Tensor]) -> torch.Tensor:
        where, rows, k = f"table '{self.config.name}'", self.config.num_embeddings, self.config.cache_rows
        if ids is not None and counts is not None:
            raise ValueError(f"{where}: populate_cache takes ids or counts, not both")
        if ids is None:
            if counts is None:
                counts = self._cache_counts
                if counts is None:
                    raise ValueError(f"{where}: no access counts: call start_cache_warmup() first, or pass ids= or counts=")
            if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (rows,):
                shape = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
                raise ValueError(f"{where}: counts must be a tensor of shape ({rows},), got {shape}")
            return top_rows(counts.to(self.cache_ids.device), k)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in _INDEX_DTYPES:
            got = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{where}: ids must be a 1-D int32 or int64 tensor, got {got}")
        if ids.numel() > k:
            raise ValueError(f"{where}: at most cache_rows={k} ids can be cached, got {ids.numel()}")
        bad = _python_ops.first_out_of_range(ids, 0, rows)
        if bad is not None:
            raise ValueError(f"{where}: ids must be in [0, {rows}), got {bad[1]} at position {bad[0]}")
        unique = torch.unique(ids.to(torch.int64))
        if unique.numel() != ids.numel():
            sorted_ids = torch.sort(ids.to(torch.int64)).values
            repeated = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
            raise ValueError(f"{where}: ids must be distinct, got {repeated} more than once")
        return unique.to(self.cache_ids.device)

    @torch.no_grad()
    def populate_cache(
        self,
        ids: Optional[torch.Tensor] = None,
        counts: Optional[torch.Tensor] = None,
        on_evict: str = "write_back",
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> CacheUpdate:
        """Fill the cache with the given rows, the top ``K`` of ``counts``, or the top ``K`` of
        the warm-up counts (which are then freed). docs/design.md, section 10.

        Args:
            ids (Optional[Tensor]): ``(<= K,)`` distinct rows to cache.
            counts (Optional[Tensor]): ``(num_embeddings,)`` access counts.
            on_evict (str): ``"write_back"`` (refit the cores to evicted rows), ``"drop"``
                (they revert to their TT value; values in the report) or ``"raise"``.
            optimizer (Optional[Optimizer]): a user optimizer holding ``cache_weight`` whose
                per-row state moves with the rows (in-backward/fused optimizers are found
                on the parameter).

        Returns:
            CacheUpdate: admitted and evicted ids, evicted values, write-back residuals.
        """
        where = f"table '{self.config.name}'"
        self._check_cached("populate_cache")
        if on_evict not in EVICTION_POLICIES:
            raise ValueError(f"{where}: on_evict must be one of {list(EVICTION_POLICIES)}, got {on_evict!r}")
        new_ids = self._rows_to_cache(ids, counts)
        rows, k, old_ids = self.config.num_embeddings, self.config.cache_rows, self.cache_ids
        valid_old = old_ids < rows
        in_new, _ = cache_hits(torch.cat([new_ids, empty_cache_ids(1, new_ids.device)]), old_ids)
        evicted_slots = torch.nonzero(valid_old & ~in_new).flatten()
        evicted = old_ids[evicted_slots]
        evicted_values = self.cache_weight[evicted_slots].detach().clone()
        residual = None
        if evicted.numel() and on_evict == "raise":
            tt_values = tt_rows(self.compute_cores(), evicted, self.config.tt_p_shapes)
            changed = ~torch.isclose(evicted_values.to(tt_values.dtype), tt_values, rtol=1e-4, atol=1e-6).all(dim=1)
            if bool(changed.any()):
                first = int(evicted[changed][0])
                raise ValueError(
                    f"{where}: populate_cache would evict row {first}, whose cached value differs from its TT value; "
                    "pass on_evict='write_back' or 'drop'"
                )
        if evicted.numel() and on_evict == "write_back":
            cores = list(self.cores)
            work = [c.detach().to(self.compute_dtype()) for c in cores]
            residual = write_back_last_core(work, evicted, evicted_values, self.config.tt_p_shapes, self.config.tt_q_shapes)
            cores[-1].copy_(work[-1].to(cores[-1].dtype))
        # New slots: kept rows keep their value (and optimizer state); admitted rows start at their TT value.
        kept, old_slot = cache_hits(old_ids, new_ids)
        kept = kept & (new_ids < rows)
        new_slots = torch.arange(new_ids.numel(), device=new_ids.device)
        weight = torch.zeros_like(self.cache_weight)
        weight[new_slots] = torch.where(
            kept[:, None],
            self.cache_weight[old_slot],
            tt_rows(self.compute_cores(), new_ids, self.config.tt_p_shapes).to(weight.dtype),
        )
        for state in self._cache_optimizer_states(optimizer):
            moved = torch.zeros_like(state)
            moved[new_slots[kept]] = state[old_slot[kept]]
            state.copy_(moved)
        self.cache_weight.copy_(weight)
        self.cache_ids.copy_(torch.cat([new_ids, empty_cache_ids(k, new_ids.device)[new_ids.numel():]]))
        self._cache_counts = None
        return CacheUpdate(
            admitted=new_ids[~kept], evicted=evicted, evicted_values=evicted_values, residual=residual, policy=on_evict
        )

    def _cache_optimizer_states(self, optimizer: Optional[torch.optim.Optimizer]) -> List[torch.Tensor]:
        """Per-row optimizer state tensors of ``cache_weight`` (shape ``(K, N)``)."""
        param, shape = self.cache_weight, tuple(self.cache_weight.shape)
        states = []
        if optimizer is not None:
            states.append(optimizer.state.get(param, {}))
        for inner in getattr(param, "_in_backward_optimizers", []):
            states.extend(inner.state.values())  # one entry: the parameter, or its fp32 stand-in
        return [v for st in states for v in st.values() if isinstance(v, torch.Tensor) and tuple(v.shape) == shape]


class CachePopulationMixin:
    """``start_cache_warmup``/``populate_cache`` over the tables in ``self.embedding_bags``
    (the unsharded collection, and the sharded one's local tables). docs/design.md, section 10."""

    embedding_bags: nn.ModuleDict

    def _known_table(self, table: str) -> bool:
        return table in self.embedding_bags

    def start_cache_warmup(self) -> None:
        """Count accesses in every cached table until :meth:`populate_cache` (a temporary
        ``(num_embeddings,)`` int64 counter per table)."""
        for bag in self.embedding_bags.values():
            if bag.config.cache_rows > 0:
                bag.start_cache_warmup()

    def stop_cache_warmup(self) -> Dict[str, torch.Tensor]:
        """Stop counting without populating: the ``(num_embeddings,)`` counts of every table
        that was counting (e.g. to measure hit rates: ``counts[cached_rows()].sum() / counts.sum()``)."""
        stopped = {name: bag.stop_cache_warmup() for name, bag in self.embedding_bags.items() if bag.config.cache_rows > 0}
        return {name: counts for name, counts in stopped.items() if counts is not None}

    def populate_cache(
        self,
        table: Optional[str] = None,
        ids: Optional[torch.Tensor] = None,
        counts: Optional[torch.Tensor] = None,
        on_evict: str = "write_back",
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> Dict[str, CacheUpdate]:
        """Fill caches: every cached table from its warm-up counts (``table=None``), or table
        ``table`` from ``ids`` or ``counts`` (see :meth:`TTEmbeddingBag.populate_cache`).

        Returns:
            Dict[str, CacheUpdate]: per table, admitted/evicted ids and the evicted values.
        """
        if table is None:
            if ids is not None or counts is not None:
                raise ValueError("populate_cache: ids= and counts= need table=")
            return {
                name: bag.populate_cache(on_evict=on_evict, optimizer=optimizer)
                for name, bag in self.embedding_bags.items()
                if bag.config.cache_rows > 0
            }
        if not self._known_table(table):
            raise ValueError(f"populate_cache: unknown table '{table}', tables: {list(self.embedding_bags)}")
        if table not in self.embedding_bags:
            return {}  # another rank's table
        return {table: self.embedding_bags[table].populate_cache(ids=ids, counts=counts, on_evict=on_evict, optimizer=optimizer)}


class TTEmbeddingBagCollection(CachePopulationMixin, EmbeddingBagCollectionInterface):
    """A collection of TT-compressed embedding bags (``EmbeddingBagCollection`` semantics).

    Input: a ``KeyedJaggedTensor`` of shape ``(F, B, L[f][i])`` (``F`` features,
    ``B`` samples, ``L[f][i]`` ids of feature ``f`` in sample ``i``).
    Output: a ``KeyedTensor`` of shape ``(B, D)`` with ``D`` the sum over features of
    their table's ``embedding_dim``, keyed by feature name in table order. Several
    features may share a table; they are looked up in one call per table.

    Args:
        tables (List[TTEmbeddingBagConfig]): the tables.
        is_weighted (bool): use the KJT's weights as per-sample weights.
        device (Optional[torch.device]): where to allocate the cores (``meta`` allowed).
        validate_inputs (bool): check every batch and raise ``ValueError`` naming the
            table, feature and bad value (costs a host sync per feature on CUDA).

    Example::

        tables = [TTEmbeddingBagConfig(name="t0", num_embeddings=1000, embedding_dim=16,
                                       feature_names=["f0", "f1"])]
        ebc = TTEmbeddingBagCollection(tables)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4, 5]),
            lengths=torch.tensor([2, 0, 1, 2]))  # B = 2
        ebc(kjt).to_dict()["f0"].shape  # torch.Size([2, 16])
    """

    def __init__(
        self,
        tables: List[TTEmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        torch._C._log_api_usage_once(f"torchrec_tt.modules.{self.__class__.__name__}")
        names, features = set(), set()
        for table in tables:
            if not isinstance(table, TTEmbeddingBagConfig):
                raise ValueError(f"table '{getattr(table, 'name', table)}' must be a TTEmbeddingBagConfig, got {type(table).__name__}")
            if not table.name or table.name in names:
                raise ValueError(f"table names must be unique and non-empty, got {table.name!r} twice or empty")
            if "." in table.name or hasattr(nn.ModuleDict, table.name):
                raise ValueError(f"table name {table.name!r} cannot be a module key (no '.', not a ModuleDict attribute)")
            names.add(table.name)
            for feature in table.feature_names:
                if feature in features:
                    raise ValueError(f"feature '{feature}' is assigned to more than one table")
                features.add(feature)
        self._embedding_bag_configs = tables
        self._is_weighted = is_weighted
        self._validate_inputs = validate_inputs
        self.embedding_bags = nn.ModuleDict({t.name: TTEmbeddingBag(t, device, validate_inputs) for t in tables})
        self._config_of = {f: t for t in tables for f in t.feature_names}
        self._embedding_names = [f for t in tables for f in t.feature_names]
        self._lengths_per_embedding = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._feature_splits = [len(t.feature_names) for t in tables]
        self._table_infos = tuple(_TableInfo(t.name, t.num_embeddings, tuple(t.feature_names)) for t in tables)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``KeyedJaggedTensor`` ``(F, B, L)`` -> ``KeyedTensor`` ``(B, D)``.

        Eager, it checks the batch (when ``validate_inputs``) and looks each table up once.
        Traced by ``torch.compile``/``torch.export`` it reads no values on the host (see
        :func:`_collection_lookups_traced`); under ``torch.fx.symbolic_trace`` the KJT handling
        becomes one graph node and each table's op another.
        """
        bags = [self.embedding_bags[t.name] for t in self._embedding_bag_configs]
        dtype = bags[0].compute_dtype()
        values = features.values()
        if isinstance(values, torch.fx.Proxy):
            lookups, batch = _collection_lookups_fx(
                features.keys(), values, features.lengths(), features.weights_or_none(),
                self._table_infos, self._is_weighted, self._validate_inputs, dtype,
            )
            pooled = [
                _side_by_side(bag._pool(lookups[i][0], lookups[i][1], lookups[i][2]), len(t.feature_names), batch, t.embedding_dim)
                for i, (t, bag) in enumerate(zip(self._embedding_bag_configs, bags))
            ]
        elif _python_ops.is_tracing(values):
            lookups, batch = _collection_lookups_traced(features, self._table_infos, self._is_weighted, dtype)
            pooled = []
            for (ids, offsets, weights, slots), bag in zip(lookups, bags):
                every_bag = bag._pool(ids, offsets, weights)  # (F * B, D), feature-major
                # Feature k's bags are rows [k * B, (k + 1) * B).
                own = [
                    every_bag.index_select(0, torch.arange(k * batch, (k + 1) * batch, device=every_bag.device))
                    for k in slots
                ]
                pooled.append(torch.cat(own, dim=1) if len(own) > 1 else own[0])
        else:
            lookups, batch = _collection_lookups(features, self._table_infos, self._is_weighted, self._validate_inputs, dtype)
            pooled = [
                _side_by_side(bag._pool(*lookup), len(t.feature_names), batch, t.embedding_dim)
                for lookup, t, bag in zip(lookups, self._embedding_bag_configs, bags)
            ]
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._lengths_per_embedding,
            values=torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0],
        )

    def embedding_bag_configs(self) -> List[TTEmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def reset_parameters(self) -> None:
        for bag in self.embedding_bags.values():
            bag.reset_parameters()

    def full_weight(self, table_name: str) -> torch.Tensor:
        """Table ``table_name`` materialized as ``(num_embeddings, embedding_dim)``."""
        return self._bag(table_name).full_weight()

    def copy_from_dense(self, table_name: str, weight: torch.Tensor) -> None:
        """Set table ``table_name`` to a TT-SVD of a dense ``(num_embeddings, dim)`` table."""
        self._bag(table_name).copy_from_dense(weight)

    def _bag(self, table_name: str) -> TTEmbeddingBag:
        if table_name not in self.embedding_bags:
            raise ValueError(f"unknown table '{table_name}', tables: {list(self.embedding_bags)}")
        return self.embedding_bags[table_name]

    def storage_report(self) -> Dict[str, Dict[str, float]]:
        """Per table: core bytes, cache bytes, dense bytes and compression ratio (cache counted)."""
        return {
            t.name: {
                "tt_bytes": t.storage_bytes(),
                "cache_bytes": t.cache_bytes(),
                "dense_bytes": t.dense_bytes(),
                "compression": t.compression_ratio(),
            }
            for t in self._embedding_bag_configs
        }
