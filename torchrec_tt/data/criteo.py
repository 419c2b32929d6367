"""Criteo Kaggle (Display Advertising Challenge) data: the TSV reader and a synthetic twin.

**Format** (``train.txt``; TorchRec's ``torchrec.datasets.criteo`` reads the same files):
one sample per line, 40 tab-separated fields: the 0/1 label, 13 integer features
(Kaggle's I1-I13, TorchRec's ``int_0..int_12``) and 26 categorical features (C1-C26,
``cat_0..cat_25``) hashed to 32-bit hex strings. Any integer or categorical field may be
empty (a missing value). The usual DLRM preprocessing, as TorchRec's
``BinaryCriteoUtils.tsv_to_npys`` and ``sparse_to_contiguous`` do it:

* integers: missing -> 0, then ``log(1 + max(x, 0))``;
* categoricals: missing -> ``0``, hex -> int, then modulo the table size
  (``cardinalities[f]``), so every sample has exactly one id per feature.

:func:`read_criteo_tsv` reads such a file; a malformed one raises ``ValueError`` naming
the path, line and column.

**Synthetic twin** (:func:`generate_criteo`; nothing can be downloaded here): the Kaggle
per-feature cardinalities (:data:`KAGGLE_CARDINALITIES`, capped at
:data:`MAX_CARDINALITY`), Zipf-distributed ids scattered over each table, log-normal
counts for the integer features, and a label from a latent-factor model with ~25 %
positives that a DLRM can learn (``docs/design.md``, section 11).
"""

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
try:
    from torchrec.datasets.criteo import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES, INT_FEATURE_COUNT
except ImportError:  # older TorchRec imports iopath (an optional dependency) with the module: same constants
    INT_FEATURE_COUNT, CAT_FEATURE_COUNT = 13, 26
    DEFAULT_INT_NAMES = [f"int_{i}" for i in range(INT_FEATURE_COUNT)]
    DEFAULT_CAT_NAMES = [f"cat_{i}" for i in range(CAT_FEATURE_COUNT)]
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Distinct values of C1..C26 in Kaggle's train.txt (45,840,617 samples), as printed by the
# reference DLRM's data loader (facebookresearch/dlrm, dlrm_data_pytorch.py, Kaggle
# preprocessing) and used by TT-Rec's Kaggle experiments.
KAGGLE_CARDINALITIES: Tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
MAX_CARDINALITY = 10_000_000  # cap of the synthetic tables (C3 has 10.1M values)
KAGGLE_COLUMNS: Tuple[str, ...] = (
    "label", *(f"I{i}" for i in range(1, INT_FEATURE_COUNT + 1)), *(f"C{i}" for i in range(1, CAT_FEATURE_COUNT + 1)))
NUM_COLUMNS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT  # 40
INT_NAMES: List[str] = list(DEFAULT_INT_NAMES)  # int_0 .. int_12 (TorchRec's names)
CAT_NAMES: List[str] = list(DEFAULT_CAT_NAMES)  # cat_0 .. cat_25: the KJT keys


def capped_kaggle_cardinalities(cap: int = MAX_CARDINALITY) -> List[int]:
    """:data:`KAGGLE_CARDINALITIES` with each entry ``min(n, cap)``."""
    if cap < 1:
        raise ValueError(f"capped_kaggle_cardinalities: cap must be >= 1, got {cap}")
    return [min(n, cap) for n in KAGGLE_CARDINALITIES]


@dataclass
class CriteoData:
    """Preprocessed Criteo samples, in memory.

    Args:
        dense (torch.Tensor): ``(N, 13)`` float32, ``log(1 + max(x, 0))`` of the integers.
        sparse (torch.Tensor): ``(N, 26)`` int64 ids, ``sparse[:, f] < cardinalities[f]``.
        labels (torch.Tensor): ``(N,)`` float32 0/1.
        cardinalities (List[int]): rows of each categorical feature's table.
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    cardinalities: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor) -> "CriteoData":
        """The samples at ``index`` (a slice or an index tensor)."""
        return CriteoData(self.dense[index], self.sparse[index], self.labels[index], list(self.cardinalities))

    def split(self, test_fraction: float) -> Tuple["CriteoData", "CriteoData"]:
        """``(train, test)``: the last ``test_fraction`` of the samples held out, in file
        order (Kaggle's samples are in time order; a later test split is the usual one)."""
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"CriteoData.split: test_fraction must be in (0, 1), got {test_fraction}")
        cut = len(self) - max(1, int(round(len(self) * test_fraction)))
        if cut < 1:
            raise ValueError(f"CriteoData.split: {len(self)} samples are too few to hold out {test_fraction}")
        return self.subset(slice(0, cut)), self.subset(slice(cut, len(self)))

    def batch(self, index: torch.Tensor) -> Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
        """``(dense (B, 13), KJT with keys CAT_NAMES and one id per bag, labels (B,))``."""
        sparse = self.sparse[index]
        b = sparse.shape[0]
        kjt = KeyedJaggedTensor(keys=CAT_NAMES, values=sparse.t().reshape(-1).contiguous(),
                                lengths=torch.ones(CAT_FEATURE_COUNT * b, dtype=torch.int32))
        return self.dense[index], kjt, self.labels[index]

    def stats(self) -> Dict[str, float]:
        """Samples, positive rate, rows of all tables, and the share of lookups that go to
        the 1 % most frequent ids of the largest table."""
        big = int(np.argmax(self.cardinalities))
        counts = torch.bincount(self.sparse[:, big], minlength=self.cardinalities[big]).sort(descending=True).values
        top = max(1, self.cardinalities[big] // 100)
        return {"samples": len(self), "positive_rate": float(self.labels.mean()) if len(self) else 0.0,
                "rows": float(sum(self.cardinalities)), "largest_table": self.cardinalities[big],
                "largest_table_top1pct_share": float(counts[:top].sum()) / max(1, len(self))}


# ----------------------------------------------------------------------------- TSV reader
def _parse_error(path: str, line: int, column: int, message: str) -> ValueError:
    return ValueError(f"{path}: line {line}, column {column + 1} ({KAGGLE_COLUMNS[column]!r}): {message}")


def read_criteo_tsv(
    path: str,
    cardinalities: Optional[Sequence[int]] = None,
    max_rows: Optional[int] = None,
) -> CriteoData:
    """Read a Criteo Kaggle ``train.txt``-format file and preprocess it (module docstring).

    Args:
        path (str): the TSV file.
        cardinalities (Optional[Sequence[int]]): 26 table sizes, the ids' moduli (default:
            :func:`capped_kaggle_cardinalities`).
        max_rows (Optional[int]): read at most this many samples.

    Returns:
        CriteoData: ``N`` samples.

    Raises:
        FileNotFoundError: no file at ``path`` (names it).
        ValueError: a line without 40 fields, a label other than 0/1, a non-integer integer
            field or a non-hex categorical field (names path, line and column), or no samples.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_criteo_tsv: no Criteo TSV file at {path}")
    cards = list(cardinalities) if cardinalities is not None else capped_kaggle_cardinalities()
    if len(cards) != CAT_FEATURE_COUNT or any(int(c) < 1 for c in cards):
        raise ValueError(f"read_criteo_tsv: cardinalities must be {CAT_FEATURE_COUNT} ints >= 1, got {cards}")
    labels: List[int] = []
    ints: List[List[int]] = []
    cats: List[List[int]] = []
    cat_base = 1 + INT_FEATURE_COUNT
    with open(path, "r", newline="") as f:
        for line_no, line in enumerate(f, start=1):
            if max_rows is not None and len(labels) >= max_rows:
                break
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != NUM_COLUMNS:
                hint = " (Kaggle's test.txt has no label column; use train.txt)" if len(fields) == NUM_COLUMNS - 1 else ""
                raise ValueError(f"{path}: line {line_no}: expected {NUM_COLUMNS} tab-separated fields (label, "
                                 f"{INT_FEATURE_COUNT} integer, {CAT_FEATURE_COUNT} categorical), found {len(fields)}{hint}")
            if fields[0] not in ("0", "1"):
                raise _parse_error(path, line_no, 0, f"expected a 0/1 label, found {fields[0]!r}")
            labels.append(int(fields[0]))
            row = []
            for c in range(1, cat_base):
                text = fields[c]
                try:
                    row.append(int(text) if text else 0)
                except ValueError:
                    raise _parse_error(path, line_no, c, f"expected an integer or an empty field, found {text!r}") from None
            ints.append(row)
            row = []
            for c in range(cat_base, NUM_COLUMNS):
                text = fields[c]
                try:
                    value = int(text, 16) if text else 0
                except ValueError:
                    raise _parse_error(path, line_no, c, f"expected a hex id or an empty field, found {text!r}") from None
                if value < 0:
                    raise _parse_error(path, line_no, c, f"expected a non-negative hex id, found {text!r}")
                row.append(value % cards[c - cat_base])
            cats.append(row)
    if not labels:
        raise ValueError(f"read_criteo_tsv: {path} holds no samples")
    dense = torch.log1p(torch.tensor(ints, dtype=torch.float64).clamp_min(0)).float()
    return CriteoData(dense, torch.tensor(cats, dtype=torch.int64), torch.tensor(labels, dtype=torch.float32), cards)


# ----------------------------------------------------------------------------- synthetic
@dataclass
class CriteoSyntheticConfig:
    """Parameters of :func:`generate_criteo`; the data is a pure function of them.

    Args:
        num_rows (int): samples.
        cardinalities (List[int]): rows of each of the 26 tables (default: Kaggle's,
            capped at 10M).
        zipf_exponent (float): ``s`` of the id distribution, ``P(rank r) ∝ r^-s``.
        positive_rate (float): target share of positive labels.
        latent_dim (int): dimension of the per-id latent vectors of the label model.
        num_pairs (int): feature pairs whose latent dot products enter the logit.
        id_scale (float): std of each feature's per-id logit effect.
        pair_scale (float): std of each pair's dot-product term.
        dense_scale (float): std of the integer features' linear term.
        seed (int): random seed.
    """

    num_rows: int = 1_000_000
    cardinalities: List[int] = field(default_factory=capped_kaggle_cardinalities)
    zipf_exponent: float = 1.1
    positive_rate: float = 0.25
    latent_dim: int = 4
    num_pairs: int = 12
    id_scale: float = 0.35
    pair_scale: float = 0.5
    dense_scale: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        self.cardinalities = [int(c) for c in self.cardinalities]
        checks = [
            ("num_rows", self.num_rows >= 1, "must be >= 1"),
            ("cardinalities", len(self.cardinalities) == CAT_FEATURE_COUNT and min(self.cardinalities) >= 1,
             f"must be {CAT_FEATURE_COUNT} ints >= 1"),
            ("zipf_exponent", self.zipf_exponent > 0 and self.zipf_exponent != 1.0, "must be > 0 and != 1"),
            ("positive_rate", 0.0 < self.positive_rate < 1.0, "must be in (0, 1)"),
            ("latent_dim", self.latent_dim >= 1, "must be >= 1"),
            ("num_pairs", 0 <= self.num_pairs <= CAT_FEATURE_COUNT * (CAT_FEATURE_COUNT - 1) // 2,
             f"must be in [0, {CAT_FEATURE_COUNT * (CAT_FEATURE_COUNT - 1) // 2}]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"CriteoSyntheticConfig: {name}={getattr(self, name)!r} {rule}")


_SCATTER = 2654435761  # a prime above every table size: rank -> id is a bijection mod n


def _hash_normal(feature: int, ids: np.ndarray, salt: int, seed: int) -> np.ndarray:
    """Standard normals that are a pure function of ``(seed, feature, salt, id)``
    (splitmix64, then the inverse normal CDF): per-id values without per-table arrays."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) + np.uint64(((seed * 1_000_003 + feature) * 97 + salt) * 0x9E3779B97F4A7C15 % (1 << 64))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    return torch.special.ndtri(torch.from_numpy(u)).numpy()


def zipf_ranks(n: int, s: float, u: torch.Tensor) -> torch.Tensor:
    """0-based ranks in ``[0, n)`` with ``P(r) ≈ ∝ (r + 1)^-s`` (continuous inverse CDF
    on ``[1, n + 1)``, floored) from uniforms ``u`` in ``[0, 1)``."""
    a = 1.0 - s
    r = torch.pow(((n + 1.0) ** a - 1.0) * u.double() + 1.0, 1.0 / a)
    return (r.floor().long() - 1).clamp_(0, n - 1)


def generate_criteo(config: CriteoSyntheticConfig) -> CriteoData:
    """Synthetic Criteo-format samples (module docstring; ``docs/design.md``, section 11).

    Ids: per feature, Zipf ranks (``config.zipf_exponent``) scattered over the table by a
    fixed bijection ``id = (rank * 2654435761 + offset_f) mod n_f``. Integers: log-normal
    counts (some features mostly missing, i.e. 0). Label: ``Bernoulli(sigmoid(logit))``
    with ``logit = bias + Σ_f e_f(id_f) + Σ_(f,g) <u_f(id_f), u_g(id_g)> + w · dense``,
    per-id effects ``e`` and latents ``u`` drawn from a hash of the id, ``bias`` set so
    that the positive rate is ``config.positive_rate``.

    Returns:
        CriteoData: ``config.num_rows`` samples.
    """
    cfg = config
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.num_rows
    sparse = torch.empty(n, CAT_FEATURE_COUNT, dtype=torch.int64)
    offsets = torch.randint(0, 1 << 30, (CAT_FEATURE_COUNT,), generator=gen)
    for f, card in enumerate(cfg.cardinalities):
        ranks = zipf_ranks(card, cfg.zipf_exponent, torch.rand(n, generator=gen, dtype=torch.float64))
        sparse[:, f] = (ranks * _SCATTER + offsets[f]) % card
    # Integer features: counts with log-normal spread and per-feature missing rates.
    mu = torch.rand(INT_FEATURE_COUNT, generator=gen) * 4.0
    sigma = 0.5 + torch.rand(INT_FEATURE_COUNT, generator=gen) * 1.5
    missing = torch.rand(INT_FEATURE_COUNT, generator=gen) * 0.5
    counts = torch.floor(torch.exp(mu + sigma * torch.randn(n, INT_FEATURE_COUNT, generator=gen))) - 1.0
    counts = torch.where(torch.rand(n, INT_FEATURE_COUNT, generator=gen) < missing, torch.zeros(()), counts)
    dense = torch.log1p(counts.clamp_min(0)).float()
    # Label model.
    logit = torch.zeros(n, dtype=torch.float64)
    ids = sparse.numpy()
    for f in range(CAT_FEATURE_COUNT):
        logit += torch.from_numpy(_hash_normal(f, ids[:, f], 0, cfg.seed)) * cfg.id_scale
    pairs = torch.combinations(torch.arange(CAT_FEATURE_COUNT), 2)
    pairs = pairs[torch.randperm(len(pairs), generator=gen)[: cfg.num_pairs]]
    latents: Dict[int, torch.Tensor] = {}

    def latent(f: int) -> torch.Tensor:  # (n, k), unit-variance dot products
        if f not in latents:
            latents[f] = torch.from_numpy(np.stack(
                [_hash_normal(f, ids[:, f], 1 + j, cfg.seed) for j in range(cfg.latent_dim)], axis=1))
        return latents[f]

    for f, g in pairs.tolist():
        logit += (latent(f) * latent(g)).sum(1) * (cfg.pair_scale / math.sqrt(cfg.latent_dim))
    z = (dense.double() - dense.double().mean(0)) / dense.double().std(0).clamp_min(1e-6)
    w = torch.randn(INT_FEATURE_COUNT, generator=gen, dtype=torch.float64) / math.sqrt(INT_FEATURE_COUNT)
    logit += z @ w * cfg.dense_scale
    bias = _bias_for_rate(logit, cfg.positive_rate)
    labels = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(logit + bias)).float()
    return CriteoData(dense, sparse, labels, list(cfg.cardinalities))


def _bias_for_rate(logit: torch.Tensor, rate: float) -> float:
    """The ``b`` with ``mean(sigmoid(logit + b)) == rate`` (bisection; monotone in ``b``)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(torch.sigmoid(logit + mid).mean()) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
