"""``TTEmbeddingBagConfig``: TorchRec's ``EmbeddingBagConfig`` plus the TT factorization."""

import functools
import math
from dataclasses import dataclass, field
from typing import List, Tuple, Union

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_tt.enums import Variant
from torchrec_tt.tt_shapes import (
    MAX_CORES,
    MIN_CORE_BYTES_LIMIT,
    MIN_CORES,
    full_ranks,
    max_useful_ranks,
    suggest_tt_shapes,
    tt_core_shapes,
    tt_num_params,
)

VARIANTS = tuple(str(v) for v in Variant)  # ("tt", "grt")
DEFAULT_RANK = 32
_SUPPORTED_POOLING = (PoolingType.SUM, PoolingType.MEAN)
_SUPPORTED_DATA_TYPES = (DataType.FP32, DataType.FP16, DataType.BF16)
# EmbeddingBagConfig fields with no TT implementation, and their "unused" defaults.
_UNSUPPORTED_FIELDS = (
    ("init_fn", None),
    ("need_pos", False),
    ("num_embeddings_post_pruning", None),
    ("input_dim", None),
    ("total_num_buckets", None),
    ("use_virtual_table", False),
    ("virtual_table_eviction_policy", None),
    ("enable_embedding_update", False),
    ("stash_weights", False),
)


@dataclass
class TTEmbeddingBagConfig(EmbeddingBagConfig):
    """An embedding-bag table stored as Tensor-Train cores.

    Core ``k`` has the shape ``(tt_p_shapes[k], R[k], tt_q_shapes[k], R[k + 1])``
    with ``R = [1, *tt_ranks, 1]``. Row ``i`` is the product of one slice of each
    core, selected by the mixed-radix digits of ``i`` (most significant first).

    Args:
        tt_p_shapes (List[int]): row factors, ``prod >= num_embeddings`` (extra rows
            are padding). Chosen by :func:`suggest_tt_shapes` when left empty.
        tt_q_shapes (List[int]): dim factors, ``prod == embedding_dim``. Chosen by
            :func:`suggest_tt_shapes` when left empty.
        tt_ranks (List[int]): the ``d - 1`` inner ranks. Default: 32 each, capped
            at the largest rank that can add expressiveness.
        variant (Variant | str): ``Variant.GRT``/``"grt"`` (group-reduced, default) or
            ``Variant.TT``/``"tt"`` (one chain per lookup, the TT-Rec baseline). Both compute
            the same values. Stored as a :class:`~torchrec_tt.Variant`.
        tt_num_cores (int): number of cores used when the shapes are left empty.
        cache_rows (int): ``K``, rows kept uncompressed in a hot-row cache (a ``(K,
            embedding_dim)`` block trained with the cores; docs/design.md, section 10).
            ``0`` (default): no cache.

    Example::

        cfg = TTEmbeddingBagConfig(name="t0", num_embeddings=23100, embedding_dim=64,
                                   feature_names=["f0"], tt_p_shapes=[21, 22, 50],
                                   tt_q_shapes=[4, 4, 4], tt_ranks=[32, 32])
        cfg.compression_ratio()  # 14.9
    """

    tt_p_shapes: List[int] = field(default_factory=list)
    tt_q_shapes: List[int] = field(default_factory=list)
    tt_ranks: List[int] = field(default_factory=list)
    variant: Union[Variant, str] = Variant.GRT
    tt_num_cores: int = 3
    cache_rows: int = 0

    def __post_init__(self) -> None:
        self._check(isinstance(self.name, str) and bool(self.name), "name", self.name, "must be a non-empty str")
        # Before TorchRec's __post_init__, which computes sqrt(1 / num_embeddings).
        for name in ("num_embeddings", "embedding_dim"):
            value = getattr(self, name)
            self._check(_is_int(value) and value >= 1, name, value, "must be an int >= 1")
        self._check(
            isinstance(self.feature_names, (list, tuple)) and all(isinstance(f, str) and f for f in self.feature_names),
            "feature_names",
            self.feature_names,
            "must be a list of non-empty str",
        )
        duplicated = sorted({f for f in self.feature_names if list(self.feature_names).count(f) > 1})
        self._check(not duplicated, "feature_names", self.feature_names, f"must be distinct ({duplicated} repeated)")
        self.feature_names = list(self.feature_names)
        self._check_unsupported_fields()  # before TorchRec's __post_init__ fills init_fn in
        super().__post_init__()
        try:
            self.variant = Variant.parse(self.variant)
        except ValueError:
            self._check(False, "variant", self.variant, f"must be one of {list(VARIANTS)} or a Variant")
        self._check(
            _is_int(self.tt_num_cores) and MIN_CORES <= self.tt_num_cores <= MAX_CORES,
            "tt_num_cores",
            self.tt_num_cores,
            f"must be an int in [{MIN_CORES}, {MAX_CORES}]",
        )
        for name in ("tt_p_shapes", "tt_q_shapes", "tt_ranks"):
            value = getattr(self, name)
            self._check(isinstance(value, (list, tuple)), name, value, "must be a list of ints")
        self._check(
            _is_int(self.cache_rows) and 0 <= self.cache_rows <= self.num_embeddings,
            "cache_rows",
            self.cache_rows,
            f"must be an int in [0, num_embeddings={self.num_embeddings}]",
        )
        self._check(
            self.pooling in _SUPPORTED_POOLING,
            "pooling",
            self.pooling,
            f"must be one of {[p.value for p in _SUPPORTED_POOLING]}",
        )
        self._check(
            self.data_type in _SUPPORTED_DATA_TYPES,
            "data_type",
            self.data_type,
            f"must be one of {[d.value for d in _SUPPORTED_DATA_TYPES]}",
        )
        if not self.tt_p_shapes or not self.tt_q_shapes:
            given = "tt_p_shapes" if self.tt_p_shapes else "tt_q_shapes"
            num_cores = len(getattr(self, given)) or self.tt_num_cores
            self._check(
                MIN_CORES <= num_cores <= MAX_CORES,
                given,
                getattr(self, given),
                f"must have {MIN_CORES} to {MAX_CORES} factors",
            )
            p, q = suggest_tt_shapes(self.num_embeddings, self.embedding_dim, num_cores)
            self.tt_p_shapes = list(self.tt_p_shapes) or p
            self.tt_q_shapes = list(self.tt_q_shapes) or q
        self.tt_p_shapes, self.tt_q_shapes = list(self.tt_p_shapes), list(self.tt_q_shapes)
        d = len(self.tt_p_shapes)
        self._check(
            MIN_CORES <= d <= MAX_CORES,
            "tt_p_shapes",
            self.tt_p_shapes,
            f"must have {MIN_CORES} to {MAX_CORES} factors",
        )
        self._check(
            len(self.tt_q_shapes) == d,
            "tt_q_shapes",
            self.tt_q_shapes,
            f"must have as many factors as tt_p_shapes ({d})",
        )
        for name in ("tt_p_shapes", "tt_q_shapes", "tt_ranks"):
            values = getattr(self, name)
            self._check(
                all(_is_int(v) and v >= 1 for v in values),
                name,
                values,
                "must hold positive ints",
            )
        self._check(
            math.prod(self.tt_p_shapes) >= self.num_embeddings,
            "tt_p_shapes",
            self.tt_p_shapes,
            f"multiply to {math.prod(self.tt_p_shapes)} < num_embeddings={self.num_embeddings}",
        )
        self._check(
            math.prod(self.tt_q_shapes) == self.embedding_dim,
            "tt_q_shapes",
            self.tt_q_shapes,
            f"multiply to {math.prod(self.tt_q_shapes)} != embedding_dim={self.embedding_dim}",
        )
        if not self.tt_ranks:
            self.tt_ranks = [
                min(DEFAULT_RANK, r) for r in max_useful_ranks(self.tt_p_shapes, self.tt_q_shapes)
            ]
        self.tt_ranks = list(self.tt_ranks)
        self._check(
            len(self.tt_ranks) == d - 1,
            "tt_ranks",
            self.tt_ranks,
            f"must hold the {d - 1} inner ranks of {d} cores",
        )
        self._check(
            all(_is_int(v) and v >= 1 for v in self.tt_ranks), "tt_ranks", self.tt_ranks, "must hold positive ints"
        )
        lo, hi = self.get_weight_init_min(), self.get_weight_init_max()
        self._check(lo <= hi, "weight_init_min", lo, f"must be <= weight_init_max={hi}")
        if lo != -hi:
            self._check(
                min(self.tt_ranks) >= 2,
                "tt_ranks",
                self.tt_ranks,
                f"must be >= 2 for an init range not centred on 0 ([{lo}, {hi}]; rank path 0 carries the mean)",
            )
        core_bytes, dense_bytes = self.storage_bytes(), self.dense_bytes()
        limit = max(dense_bytes, MIN_CORE_BYTES_LIMIT)
        self._check(
            core_bytes <= limit,
            "tt_ranks",
            self.tt_ranks,
            f"make cores of {core_bytes} bytes, more than the dense table ({dense_bytes} bytes) and "
            f"{MIN_CORE_BYTES_LIMIT} bytes; expected ranks whose cores take at most {limit} bytes",
        )

    def _check_unsupported_fields(self) -> None:
        """``EmbeddingBagConfig`` fields TT tables do not implement: rejected, never dropped."""
        why = {
            "init_fn": "is not supported: TT rows are products of cores, so an init of the materialized rows "
            "cannot be applied; use weight_init_min/weight_init_max, or init a dense table and "
            "TTEmbeddingBagCollection.copy_from_dense / torchrec_tt.convert_ebc_to_tt",
            "need_pos": "is not supported (no positional weights for TT tables)",
        }
        for name, default in _UNSUPPORTED_FIELDS:
            value = getattr(self, name, default)
            if name == "init_fn" and self._is_torchrec_default_init(value):
                continue  # the uniform init TorchRec's __post_init__ fills in (a copied config)
            if value != default:
                self._check(False, name, value, why.get(name, f"is not supported by TT tables (expected {default!r})"))

    def _is_torchrec_default_init(self, init_fn: object) -> bool:
        return (
            isinstance(init_fn, functools.partial)
            and init_fn.func is torch.nn.init.uniform_
            and init_fn.keywords == {"a": self.get_weight_init_min(), "b": self.get_weight_init_max()}
        )

    def _check(self, ok: bool, field_name: str, value: object, why: str) -> None:
        if not ok:
            raise ValueError(f"TTEmbeddingBagConfig '{self.name}': {field_name}={value!r} {why}")

    @property
    def num_cores(self) -> int:
        return len(self.tt_p_shapes)

    @property
    def full_ranks(self) -> List[int]:
        """``[1, *tt_ranks, 1]``."""
        return full_ranks(self.tt_ranks)

    @property
    def core_shapes(self) -> List[Tuple[int, int, int, int]]:
        """Shapes ``(m_k, R[k], n_k, R[k+1])`` of the cores."""
        return tt_core_shapes(self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks)

    @property
    def num_groups(self) -> int:
        """Number of GRT groups: rows sharing all TT digits but the last."""
        return math.ceil(self.num_embeddings / self.tt_p_shapes[-1])

    def storage_bytes(self) -> int:
        """Bytes of all cores."""
        return tt_num_params(self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks) * _bytes_per_element(self)

    def cache_bytes(self) -> int:
        """Bytes of the hot-row cache: the ``(K, embedding_dim)`` rows plus ``K`` int64 ids."""
        return self.cache_rows * (self.embedding_dim * _bytes_per_element(self) + 8)

    def dense_bytes(self) -> int:
        """Bytes of the equivalent uncompressed ``(num_embeddings, embedding_dim)`` table."""
        return self.num_embeddings * self.embedding_dim * _bytes_per_element(self)

    def compression_ratio(self) -> float:
        """``dense_bytes() / (storage_bytes() + cache_bytes())``: the cache counted."""
        return self.dense_bytes() / (self.storage_bytes() + self.cache_bytes())

    def tt_fused_params(self) -> Tuple[Tuple[str, object], ...]:
        """Hashable description of the TT layout (TorchRec groups tables by ``fused_params``)."""
        return (
            ("tt_p_shapes", tuple(self.tt_p_shapes)),
            ("tt_q_shapes", tuple(self.tt_q_shapes)),
            ("tt_ranks", tuple(self.tt_ranks)),
            ("variant", str(self.variant)),  # a plain str: fused_params travel through TorchRec
            ("cache_rows", int(self.cache_rows)),
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bytes_per_element(config: EmbeddingBagConfig) -> int:
    return {DataType.FP32: 4, DataType.FP16: 2, DataType.BF16: 2}[config.data_type]
