"""``suggest_tt_shapes`` and ``TTEmbeddingBagConfig``: shapes, defaults, errors, compression."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_tt import TTEmbeddingBagConfig, Variant, suggest_tt_shapes
from torchrec_tt.tt_shapes import max_useful_ranks


def _exact_factorizations(n, d):
    if d == 1:
        yield [n]
        return
    for f in range(1, n + 1):
        if n % f == 0:
            for rest in _exact_factorizations(n // f, d - 1):
                yield [f, *rest]


def _core_elements(p, q, inner_ranks):
    """Independent count: sum over cores of m_k * R[k] * n_k * R[k+1]."""
    ranks = [1, *inner_ranks, 1]
    return sum(p[k] * ranks[k] * q[k] * ranks[k + 1] for k in range(len(p)))


@settings(deadline=None, max_examples=30)
@given(rows=st.integers(1, 10**8), dim=st.integers(1, 256), d=st.integers(2, 4))
def test_suggest_tt_shapes_products_and_balance(rows, dim, d):
    p, q = suggest_tt_shapes(rows, dim, d)
    assert len(p) == len(q) == d
    assert all(isinstance(v, int) and v >= 1 for v in p + q)
    assert math.prod(p) >= rows  # never fewer rows
    assert math.prod(q) == dim
    # Balanced rows: no factor above the d-th root (rounded up), and padding of lower order.
    root = math.ceil(round(rows ** (1 / d), 9))
    assert max(p) <= root
    assert math.prod(p) - rows <= (d - 1) * root ** (d - 1)
    # Balanced dims: the largest factor is within 2x of the best exact factorization.
    best = min(max(f) for f in _exact_factorizations(dim, d))
    assert max(q) <= 2 * best


@pytest.mark.parametrize("dim", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("d", [2, 3, 4])
def test_suggest_tt_shapes_power_of_two_dims(dim, d):
    _, q = suggest_tt_shapes(1000, dim, d)
    assert math.prod(q) == dim and max(q) <= 2 * min(q)


@pytest.mark.parametrize("rows", [10**4, 123457, 10**6, 10**7])
@pytest.mark.parametrize("d", [2, 3, 4])
def test_suggest_tt_shapes_large_tables_pad_little(rows, d):
    p, _ = suggest_tt_shapes(rows, 64, d)
    assert rows <= math.prod(p) <= 1.1 * rows


@pytest.mark.parametrize("bad", [dict(num_cores=1), dict(num_cores=5), dict(num_embeddings=0), dict(embedding_dim=0)])
def test_suggest_tt_shapes_rejects(bad):
    args = dict(num_embeddings=100, embedding_dim=16, num_cores=3) | bad
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=rf"{name}.*{value}"):
        suggest_tt_shapes(**args)


def test_config_is_a_torchrec_config_with_defaults():
    cfg = TTEmbeddingBagConfig(name="t0", num_embeddings=23100, embedding_dim=64, feature_names=["f"])
    assert isinstance(cfg, EmbeddingBagConfig)
    assert (cfg.tt_p_shapes, cfg.tt_q_shapes) == tuple(suggest_tt_shapes(23100, 64, 3))
    assert cfg.tt_ranks == [min(32, r) for r in max_useful_ranks(cfg.tt_p_shapes, cfg.tt_q_shapes)]
    assert cfg.variant is Variant.GRT and cfg.pooling == PoolingType.SUM
    assert cfg.num_cores == 3 and cfg.full_ranks == [1, *cfg.tt_ranks, 1]
    assert cfg.core_shapes == [
        (cfg.tt_p_shapes[k], cfg.full_ranks[k], cfg.tt_q_shapes[k], cfg.full_ranks[k + 1]) for k in range(3)
    ]
    assert cfg.num_groups == math.ceil(23100 / cfg.tt_p_shapes[-1])


def test_config_default_ranks_are_capped_for_small_tables():
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=30, embedding_dim=6, feature_names=["f"])
    bounds = max_useful_ranks(cfg.tt_p_shapes, cfg.tt_q_shapes)
    assert min(bounds) < 32  # the cap is active for this table
    assert cfg.tt_ranks == [min(32, b) for b in bounds]


@pytest.mark.parametrize("num_cores", [2, 4])
def test_config_num_cores(num_cores):
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=5000, embedding_dim=16, feature_names=["f"], tt_num_cores=num_cores)
    assert cfg.num_cores == num_cores and len(cfg.tt_ranks) == num_cores - 1


def test_config_fills_the_missing_factorization():
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"], tt_p_shapes=[10, 100])
    assert cfg.tt_p_shapes == [10, 100] and len(cfg.tt_q_shapes) == 2 and math.prod(cfg.tt_q_shapes) == 16
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"], tt_q_shapes=[2, 2, 2, 2])
    assert len(cfg.tt_p_shapes) == 4 and math.prod(cfg.tt_p_shapes) >= 1000


@pytest.mark.parametrize(
    "overrides, field, value",
    [
        (dict(tt_q_shapes=[4, 4, 2]), "tt_q_shapes", r"\[4, 4, 2\].*32.*embedding_dim=64"),
        (dict(tt_p_shapes=[10, 10, 10]), "tt_p_shapes", r"\[10, 10, 10\].*1000 < num_embeddings=23100"),
        (dict(tt_ranks=[32]), "tt_ranks", r"\[32\]"),
        (dict(tt_ranks=[32, 0]), "tt_ranks", r"\[32, 0\]"),
        (dict(tt_p_shapes=[2] * 15, tt_q_shapes=[2] * 6 + [1] * 9), "tt_p_shapes", r"\[2, 2"),
        (dict(tt_p_shapes=[23100], tt_q_shapes=[64]), "tt_p_shapes", r"\[23100\]"),
        (dict(tt_q_shapes=[4, 16]), "tt_q_shapes", r"\[4, 16\]"),
        (dict(tt_q_shapes=[4, -4, -4]), "tt_q_shapes", r"\[4, -4, -4\]"),
        (dict(tt_p_shapes=[21.0, 22, 50]), "tt_p_shapes", r"21\.0"),
        (dict(variant="fast"), "variant", r"'fast'"),
        (dict(pooling=PoolingType.NONE), "pooling", r"NONE"),
        (dict(data_type=DataType.INT8), "data_type", r"INT8"),
        (dict(num_embeddings=0), "num_embeddings", r"=0\b"),
        (dict(num_embeddings=-5), "num_embeddings", r"-5"),
        (dict(embedding_dim=0, tt_q_shapes=[]), "embedding_dim", r"=0\b"),
    ],
)
def test_config_errors_name_table_and_field(overrides, field, value):
    args = dict(name="paper_table", num_embeddings=23100, embedding_dim=64, feature_names=["f"],
                tt_p_shapes=[21, 22, 50], tt_q_shapes=[4, 4, 4], tt_ranks=[32, 32]) | overrides
    with pytest.raises(ValueError) as excinfo:
        TTEmbeddingBagConfig(**args)
    message = str(excinfo.value)
    assert "paper_table" in message and field in message, message
    assert re.search(value, message), message


def test_compression_paper_table():
    p, q, ranks = [21, 22, 50], [4, 4, 4], [32, 32]
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=23100, embedding_dim=64, feature_names=["f"],
                               tt_p_shapes=p, tt_q_shapes=q, tt_ranks=ranks)
    elements = _core_elements(p, q, ranks)
    assert cfg.storage_bytes() == 4 * elements
    assert cfg.dense_bytes() == 4 * 23100 * 64
    assert cfg.compression_ratio() == pytest.approx(23100 * 64 / elements)
    assert round(cfg.compression_ratio(), 1) == 14.9


def test_compression_ten_million_rows():
    rows, dim = 10_000_000, 64
    p, q = suggest_tt_shapes(rows, dim)
    cfg = TTEmbeddingBagConfig(name="big", num_embeddings=rows, embedding_dim=dim, feature_names=["f"], tt_ranks=[32, 32])
    assert (cfg.tt_p_shapes, cfg.tt_q_shapes) == (p, q)
    independent = rows * dim / _core_elements(p, q, [32, 32])
    assert cfg.compression_ratio() == pytest.approx(independent)
    assert cfg.compression_ratio() >= 500


def test_fused_params_are_hashable():
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"], variant="tt")
    key = cfg.tt_fused_params()
    assert hash(key) == hash(TTEmbeddingBagConfig(name="u", num_embeddings=100, embedding_dim=8, feature_names=["g"], variant="tt").tt_fused_params())
    assert dict(key)["variant"] == "tt" and dict(key)["tt_ranks"] == tuple(cfg.tt_ranks)


# Issue 10 (part A): config values are checked by type and size, and named with the table.


def _paper(**overrides):
    args = dict(name="paper_table", num_embeddings=23100, embedding_dim=64, feature_names=["f"],
                tt_p_shapes=[21, 22, 50], tt_q_shapes=[4, 4, 4], tt_ranks=[32, 32]) | overrides
    return TTEmbeddingBagConfig(**args)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(num_embeddings=2.5), r"num_embeddings=2\.5 must be an int >= 1"),
        (dict(num_embeddings=True), r"num_embeddings=True must be an int >= 1"),
        (dict(embedding_dim="64"), r"embedding_dim='64' must be an int >= 1"),
        (dict(tt_ranks=[True, 32]), r"tt_ranks=\[True, 32\] must hold positive ints"),
        (dict(tt_ranks=(32, 32.0)), r"tt_ranks=\(32, 32\.0\) must hold positive ints"),
        (dict(tt_num_cores=7), r"tt_num_cores=7 must be an int in \[2, 4\]"),
        (dict(tt_p_shapes=[], tt_q_shapes=[], tt_num_cores=7), r"tt_num_cores=7 must be an int in \[2, 4\]"),
        (dict(tt_p_shapes=[], tt_q_shapes=[64]), r"tt_q_shapes=\[64\] must have 2 to 4 factors"),
        (dict(feature_names=["f", "g", "f"]), r"feature_names=\['f', 'g', 'f'\] must be distinct \(\['f'\] repeated\)"),
        (dict(feature_names="f"), r"feature_names='f' must be a list of non-empty str"),
        (dict(variant=2), r"variant=2 must be one of \['tt', 'grt'\] or a Variant"),
    ],
)
def test_config_types_are_checked(overrides, pattern):
    with pytest.raises(ValueError) as excinfo:
        _paper(**overrides)
    assert str(excinfo.value).startswith("TTEmbeddingBagConfig 'paper_table': "), str(excinfo.value)
    assert re.search(pattern, str(excinfo.value)), str(excinfo.value)


def test_ranks_too_large_get_a_size_check_naming_table_ranks_and_bytes():
    """Before: an allocator error when the module allocated ~1.6 TB of cores."""
    ranks = [200_000, 200_000]
    elements = _core_elements([21, 22, 50], [4, 4, 4], ranks)
    with pytest.raises(ValueError) as excinfo:
        _paper(tt_ranks=ranks)
    message = str(excinfo.value)
    assert message.startswith("TTEmbeddingBagConfig 'paper_table': tt_ranks=[200000, 200000] make cores of "), message
    assert f"{4 * elements} bytes" in message and f"{23100 * 64 * 4} bytes" in message, message


def test_large_ranks_within_the_limit_are_accepted():
    """Cores may exceed the dense table (tiny tables, tests) up to 1 GiB."""
    cfg = TTEmbeddingBagConfig(name="tiny", num_embeddings=4, embedding_dim=4, feature_names=["f"],
                               tt_p_shapes=[2, 2], tt_q_shapes=[2, 2], tt_ranks=[64])
    assert cfg.storage_bytes() > cfg.dense_bytes()


@pytest.mark.parametrize("variant", ["tt", "TT", Variant.TT, 0])
def test_variant_accepts_strings_and_the_enum(variant):
    cfg = _paper(variant=variant)
    assert cfg.variant is Variant.TT and str(cfg.variant) == "tt"
    assert dict(cfg.tt_fused_params())["variant"] == "tt"
