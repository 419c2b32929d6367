"""The hot-row cache (docs/design.md, section 10) against an independent reference.

Reference: the whole table materialized from the cores with ``tt_to_dense`` (whole-core
contraction), the cached rows replaced by the cache block, pooled with ``F.embedding_bag``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor, PoolingType

from torchrec_tt import (
    QuantTTEmbeddingBagCollection,
    TTEmbeddingBag,
    TTEmbeddingBagCollection,
    TTEmbeddingBagConfig,
    count_ops,
    tt_to_dense,
)
from torchrec_tt.cache import cached_tt_embedding_bag
from torchrec_tt.distributed.planner import table_op_counts, tt_compute_ms, tt_table_bytes
from tt_testing import assert_message

ROWS = 100


def _config(variant: str = "grt", pooling: str = "sum", cache_rows: int = 10, **kwargs) -> TTEmbeddingBagConfig:
    return TTEmbeddingBagConfig(
        name="t", num_embeddings=ROWS, embedding_dim=8, feature_names=["f"], tt_p_shapes=[4, 5, 5],
        tt_q_shapes=[2, 2, 2], tt_ranks=[3, 3], variant=variant, cache_rows=cache_rows,
        pooling=PoolingType.MEAN if pooling == "mean" else PoolingType.SUM, **kwargs,
    )


def _bag(variant: str = "grt", pooling: str = "sum", cached=(1, 3, 7, 50, 99), seed: int = 0, **kwargs) -> TTEmbeddingBag:
    torch.manual_seed(seed)
    bag = TTEmbeddingBag(_config(variant, pooling, **kwargs)).double()
    bag.populate_cache(ids=torch.tensor(cached))
    with torch.no_grad():  # cached values that the cores cannot give: a wrong split shows
        bag.cache_weight.add_(torch.randn_like(bag.cache_weight))
    return bag


def _reference(bag: TTEmbeddingBag, ids, offsets, weights=None, pooling: str = "sum") -> torch.Tensor:
    """TT rows with the cached rows replaced, pooled by ``F.embedding_bag`` (differentiable)."""
    dense = tt_to_dense(list(bag.cores), ROWS)
    valid = bag.cache_ids < ROWS
    rows = torch.zeros(ROWS, dtype=torch.bool)
    rows[bag.cache_ids[valid]] = True
    slot_of = torch.zeros(ROWS, dtype=torch.int64)
    slot_of[bag.cache_ids[valid]] = torch.nonzero(valid).flatten()
    table = torch.where(rows[:, None], bag.cache_weight[slot_of], dense)
    ids, offsets = ids.to(torch.int64), offsets.to(torch.int64)
    if weights is not None and pooling == "mean":
        lengths = (offsets[1:] - offsets[:-1]).clamp_min(1).to(table.dtype)
        weights = weights / torch.repeat_interleave(lengths, offsets[1:] - offsets[:-1])
        pooling = "sum"
    return F.embedding_bag(ids, table, offsets, mode=pooling, per_sample_weights=weights, include_last_offset=True)


IDS = [1, 2, 3, 50, 60, 7, 7, 99, 0, 51]  # hits 1, 3, 50, 7, 7, 99; misses 2, 60, 0, 51
OFFSETS = [0, 3, 3, 6, 9, 10]  # an empty bag, a bag of hits only (7, 7, 99)


@pytest.mark.parametrize("variant", ["grt", "tt"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("compact", [None, False, True], ids=["default", "trash_bag", "compact"])
def test_matches_reference(variant, pooling, weighted, index_dtype, compact):
    bag = _bag(variant, pooling)
    ids, offsets = torch.tensor(IDS, dtype=index_dtype), torch.tensor(OFFSETS, dtype=index_dtype)
    weights = torch.rand(len(IDS), dtype=torch.float64, generator=torch.Generator().manual_seed(1)) if weighted else None
    if compact is None:
        out = bag(ids, offsets, weights)
    else:
        out = cached_tt_embedding_bag(
            bag.compute_cores(), bag.cache_weight, bag.cache_ids, ids, offsets, weights, bag._pooling, bag.config.variant, compact
        )
    torch.testing.assert_close(out, _reference(bag, ids, offsets, weights, pooling), rtol=1e-9, atol=1e-9)
    assert torch.count_nonzero(out[1]) == 0  # the empty bag


@pytest.mark.parametrize("cached", [tuple(range(ROWS - 10, ROWS)), (4, 5)], ids=["all_hits", "no_hits"])
def test_all_hits_and_no_hits(cached):
    bag = _bag(cached=cached)
    ids = torch.tensor([90, 91, 99, 95]) if cached[0] == ROWS - 10 else torch.tensor([0, 1, 2, 3])
    offsets = torch.tensor([0, 2, 4])
    torch.testing.assert_close(bag(ids, offsets), _reference(bag, ids, offsets), rtol=1e-9, atol=1e-9)
    # No lookups at all (B = 2, L = 0) and no bags (B = 0).
    assert torch.count_nonzero(bag(torch.tensor([], dtype=torch.int64), torch.tensor([0, 0, 0]))) == 0
    assert bag(torch.tensor([], dtype=torch.int64), torch.tensor([0])).shape == (0, 8)


@pytest.mark.parametrize("variant", ["grt", "tt"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_gradcheck(variant, pooling):
    bag = _bag(variant, pooling)
    ids, offsets = torch.tensor(IDS), torch.tensor(OFFSETS)
    weights = torch.rand(len(IDS), dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    cores = [c.detach().clone().requires_grad_(True) for c in bag.cores]
    cache = bag.cache_weight.detach().clone().requires_grad_(True)

    def fn(cache, weights, *cores):
        return cached_tt_embedding_bag(list(cores), cache, bag.cache_ids, ids, offsets, weights, bag._pooling, bag.config.variant)

    assert torch.autograd.gradcheck(fn, (cache, weights, *cores), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradients_split_between_cache_and_cores():
    """Hits train only their cache rows, misses only the cores; one optimizer step."""
    bag = _bag()
    before = {n: p.detach().clone() for n, p in bag.named_parameters()}
    optimizer = torch.optim.SGD(bag.parameters(), lr=0.1)
    bag(torch.tensor([7, 99, 7]), torch.tensor([0, 3])).sum().backward()  # hits only
    assert all(torch.count_nonzero(c.grad) == 0 for c in bag.cores)
    slots = torch.searchsorted(bag.cache_ids, torch.tensor([7, 99]))
    grad = bag.cache_weight.grad
    torch.testing.assert_close(grad[slots], torch.tensor([[2.0] * 8, [1.0] * 8], dtype=torch.float64))
    assert torch.count_nonzero(grad) == 16  # only the two hit rows
    optimizer.step()
    changed = (bag.cache_weight.detach() != before["cache_weight"]).any(dim=1)
    assert torch.equal(torch.nonzero(changed).flatten(), slots)
    optimizer.zero_grad()
    bag(torch.tensor([2, 60]), torch.tensor([0, 2])).sum().backward()  # misses only
    assert torch.count_nonzero(bag.cache_weight.grad) == 0
    assert all(torch.count_nonzero(c.grad) > 0 for c in bag.cores)


def test_no_cache_adds_nothing():
    plain = TTEmbeddingBag(_config(cache_rows=0))
    assert [n for n, _ in plain.named_parameters()] == ["cores.0", "cores.1", "cores.2"]
    assert list(plain.state_dict()) == ["cores.0", "cores.1", "cores.2"]
    cached = TTEmbeddingBag(_config(cache_rows=4))
    assert sorted(cached.state_dict()) == ["cache_ids", "cache_weight", "cores.0", "cores.1", "cores.2"]
    # A fresh cache is empty: sentinel ids (the largest int64 values), no hits.
    assert cached.cache_ids.tolist() == [2**63 - 4, 2**63 - 3, 2**63 - 2, 2**63 - 1]
    cached.load_state_dict({**plain.state_dict(), "cache_ids": cached.cache_ids, "cache_weight": cached.cache_weight})
    ids, offsets = torch.tensor([0, 5, 99]), torch.tensor([0, 1, 3])
    torch.testing.assert_close(cached(ids, offsets), plain(ids, offsets))


def _kjt(ids, lengths) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=["f"], values=torch.tensor(ids), lengths=torch.tensor(lengths))


def test_population_from_warmup_counts_is_exact_and_frees_the_counts():
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection([_config(cache_rows=3)])
    batches = [_kjt([5, 5, 9, 1], [3, 1]), _kjt([5, 9, 2, 7, 7], [2, 3]), _kjt([7, 40], [1, 1])]
    ebc.start_cache_warmup()
    before = [ebc(b).values().detach() for b in batches]
    counts = ebc.embedding_bags["t"].cache_counts
    assert counts[[5, 9, 7, 1, 2, 40]].tolist() == [3, 2, 3, 1, 1, 1]
    report = ebc.populate_cache()["t"]
    assert ebc.embedding_bags["t"].cached_rows().tolist() == [5, 7, 9]
    assert report.admitted.tolist() == [5, 7, 9] and report.evicted.numel() == 0
    assert ebc.embedding_bags["t"].cache_counts is None  # temporary memory freed
    for b, expected in zip(batches, before):  # a newly cached row starts at its TT value
        torch.testing.assert_close(ebc(b).values(), expected)
    with pytest.raises(ValueError) as e:
        ebc.populate_cache()
    assert_message(e, "table 't'", "start_cache_warmup")


def test_population_from_ids_and_counts_and_storage():
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection([_config(cache_rows=4)])
    ebc.populate_cache("t", ids=torch.tensor([8, 3], dtype=torch.int32))
    assert ebc.embedding_bags["t"].cache_ids.tolist() == [3, 8, 2**63 - 2, 2**63 - 1]
    counts = torch.zeros(ROWS, dtype=torch.int64)
    counts[[10, 20, 30, 40, 50]] = torch.tensor([5, 1, 9, 7, 3])
    ebc.populate_cache("t", counts=counts, on_evict="drop")
    assert ebc.embedding_bags["t"].cached_rows().tolist() == [10, 30, 40, 50]
    report = ebc.storage_report()["t"]
    assert report["cache_bytes"] == 4 * (8 * 4 + 8)
    assert report["compression"] == pytest.approx(ROWS * 8 * 4 / (report["tt_bytes"] + report["cache_bytes"]))


@pytest.mark.parametrize(
    "kwargs, patterns",
    [
        ({"ids": torch.tensor([1, ROWS])}, [f"ids must be in \\[0, {ROWS}\\)", f"got {ROWS}"]),
        ({"ids": torch.tensor([4, 4])}, ["distinct", "got 4"]),
        ({"ids": torch.arange(5)}, ["cache_rows=4", "got 5"]),
        ({"ids": torch.tensor([1.0])}, ["int32 or int64", "torch.float32"]),
        ({"counts": torch.ones(3)}, [f"shape \\({ROWS},\\)", "got \\(3,\\)"]),
        ({"ids": torch.tensor([1]), "counts": torch.ones(ROWS)}, ["not both"]),
        ({"ids": torch.tensor([1]), "on_evict": "keep"}, ["on_evict", "'keep'"]),
    ],
)
def test_bad_population_arguments(kwargs, patterns):
    ebc = TTEmbeddingBagCollection([_config(cache_rows=4)])
    with pytest.raises(ValueError) as e:
        ebc.populate_cache("t", **kwargs)
    assert_message(e, "table 't'", *patterns)


def test_bad_cache_rows_and_tables():
    for value in (-1, ROWS + 1, 2.0):
        with pytest.raises(ValueError) as e:
            _config(cache_rows=value)
        assert_message(e, "'t'", f"cache_rows={value!r}", f"num_embeddings={ROWS}")
    with pytest.raises(ValueError) as e:
        TTEmbeddingBagCollection([_config(cache_rows=2)]).populate_cache("u", ids=torch.tensor([1]))
    assert_message(e, "unknown table 'u'")
    with pytest.raises(ValueError) as e:
        TTEmbeddingBag(_config(cache_rows=0)).populate_cache(ids=torch.tensor([1]))
    assert_message(e, "table 't'", "cache_rows=0")
    with pytest.raises(ValueError) as e:
        QuantTTEmbeddingBagCollection.from_float(TTEmbeddingBagCollection([_config(cache_rows=2)]), weight_dtype=torch.int8)
    assert_message(e, "table 't'", "cache_rows=2")


def _trained(bag: TTEmbeddingBag) -> torch.Tensor:
    """The cached values (differ from the TT values after _bag's perturbation)."""
    return bag.cache_weight.detach().clone()


def test_eviction_drop_returns_values_and_reverts():
    bag = _bag()
    values, tt_before = _trained(bag), tt_to_dense(list(bag.cores), ROWS)
    report = bag.populate_cache(ids=torch.tensor([1, 3, 8]), on_evict="drop")
    assert report.evicted.tolist() == [7, 50, 99] and report.admitted.tolist() == [8] and report.residual is None
    torch.testing.assert_close(report.evicted_values, values[[2, 3, 4]])
    full = bag.full_weight()
    torch.testing.assert_close(full[[7, 50, 99]], tt_before[[7, 50, 99]])  # back to the TT value
    torch.testing.assert_close(full[[1, 3]], values[[0, 1]])  # kept rows keep their cached value
    torch.testing.assert_close(full[8], tt_before[8])  # admitted at its TT value


def test_eviction_raise_refuses_to_lose_values():
    bag = _bag()
    state = {k: v.clone() for k, v in bag.state_dict().items()}
    with pytest.raises(ValueError) as e:
        bag.populate_cache(ids=torch.tensor([1]), on_evict="raise")
    assert_message(e, "table 't'", "evict row 3", "write_back")
    assert all(torch.equal(v, state[k]) for k, v in bag.state_dict().items())  # nothing changed
    torch.manual_seed(0)
    untrained = TTEmbeddingBag(_config()).double()
    untrained.populate_cache(ids=torch.tensor([1, 2]))
    assert untrained.populate_cache(ids=torch.tensor([5]), on_evict="raise").evicted.tolist() == [1, 2]


def test_eviction_write_back_fits_the_cores():
    bag = _bag(cached=(7, 33))  # different last digits (7 % 5, 33 % 5): one slice each
    values = _trained(bag)[:2]
    other = bag.full_weight()[[0, 60]]  # last digit 0: a slice the write-back does not touch
    drop_error = (tt_to_dense(list(bag.cores), ROWS)[[7, 33]] - values).norm(dim=1) / values.norm(dim=1)
    report = bag.populate_cache(ids=torch.tensor([5]), on_evict="write_back")
    assert report.evicted.tolist() == [7, 33]
    measured = (bag.full_weight()[[7, 33]] - values).norm(dim=1) / values.norm(dim=1)
    torch.testing.assert_close(report.residual, measured)  # the report tells the truth
    assert (report.residual < 0.8 * drop_error).all(), (report.residual, drop_error)
    torch.testing.assert_close(bag.full_weight()[[0, 60]], other)  # slice 0 untouched


def test_eviction_write_back_is_exact_for_values_the_cores_can_hold():
    """Cached values that a different last core gives: written back up to the damping."""
    bag = _bag(cached=(7, 33))
    other_last = torch.randn_like(bag.cores[2])
    with torch.no_grad():
        bag.cache_weight[:2] = tt_to_dense([bag.cores[0], bag.cores[1], other_last], ROWS)[[7, 33]]
    report = bag.populate_cache(ids=torch.tensor([5]), on_evict="write_back")
    assert (report.residual < 1e-2).all(), report.residual


def test_optimizer_state_moves_with_the_rows():
    bag = _bag()
    optimizer = torch.optim.Adagrad(bag.parameters(), lr=0.1)
    bag(torch.tensor([1, 3, 3, 50]), torch.tensor([0, 4])).sum().backward()
    optimizer.step()
    state = optimizer.state[bag.cache_weight]["sum"].clone()
    old = {int(i): state[s] for s, i in enumerate(bag.cache_ids.tolist())}
    bag.populate_cache(ids=torch.tensor([0, 3, 50, 80]), on_evict="drop", optimizer=optimizer)
    moved = optimizer.state[bag.cache_weight]["sum"]
    for slot, row in enumerate(bag.cache_ids.tolist()):
        expected = old.get(row, torch.zeros(8, dtype=torch.float64)) if row < ROWS else torch.zeros(8, dtype=torch.float64)
        torch.testing.assert_close(moved[slot], expected, msg=f"slot {slot} row {row}")


def test_state_dict_round_trip():
    bag = _bag()
    fresh = TTEmbeddingBag(_config()).double()
    fresh.load_state_dict(bag.state_dict())
    ids, offsets = torch.tensor(IDS), torch.tensor(OFFSETS)
    torch.testing.assert_close(fresh(ids, offsets), bag(ids, offsets), rtol=0, atol=0)
    assert torch.equal(fresh.cached_rows(), torch.tensor([1, 3, 7, 50, 99]))


def test_collection_fx_trace_and_copy_from_dense():
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection([_config(cache_rows=3)])
    ebc.populate_cache("t", ids=torch.tensor([2, 4, 6]))
    with torch.no_grad():
        ebc.embedding_bags["t"].cache_weight.mul_(3)
    kjt = _kjt([2, 3, 4, 6, 6], [2, 3])
    traced = torch.fx.symbolic_trace(ebc)
    torch.testing.assert_close(traced(kjt).values(), ebc(kjt).values())
    dense = torch.randn(ROWS, 8)
    ebc.copy_from_dense("t", dense)
    torch.testing.assert_close(ebc.full_weight("t")[[2, 4, 6]], dense[[2, 4, 6]])  # cached rows exact


def test_count_ops_reports_hits_and_the_tt_part():
    cfg = _config(cache_rows=3)
    ids, offsets = torch.tensor(IDS), torch.tensor(OFFSETS)
    counts = count_ops(cfg, ids, offsets, cache_ids=torch.tensor([1, 3, 7]))
    misses = torch.tensor([2, 50, 60, 99, 0, 51])  # 1, 3, 7, 7 are hits
    expected = count_ops(cfg, misses, torch.tensor([0, 1, 1, 3, 5, 6]))
    assert counts.num_cache_hits == 4 and counts.num_lookups == 6
    assert counts.cache_hit_rate == pytest.approx(0.4)
    assert (counts.pooling_factor, counts.groups_per_bag, counts.grt_flops) == (
        expected.pooling_factor, expected.groups_per_bag, expected.grt_flops,
    )
    # Each hit adds its cached row into its bag (forward) and its bag's gradient into the row's
    # (backward): 2 N FLOPs each, in both variants.
    dim = cfg.embedding_dim
    assert (counts.cache_flops, counts.cache_backward_flops) == (4 * 2 * dim, 4 * 2 * dim)
    assert counts.forward_flops("grt") == expected.grt_flops + 4 * 2 * dim
    assert counts.backward_flops("tt") == expected.tt_backward_flops + 4 * 2 * dim
    uncached = count_ops(cfg, ids, offsets)
    assert uncached.num_cache_hits == 0 and uncached.cache_flops == uncached.cache_backward_flops == 0
    assert uncached.forward_flops("grt") == uncached.grt_flops


def test_planner_prices_the_cache():
    plain, cached = _config(cache_rows=0), _config(cache_rows=20)
    assert tt_table_bytes(cached, 1.0) - tt_table_bytes(plain, 1.0) == 20 * 8 * 4 * 2 + 20 * 8
    full = table_op_counts(plain, [100], [10.0], [None])
    modelled = table_op_counts(cached, [100], [10.0], [None])  # h = 20 / 100
    assert modelled.num_lookups == 800 and modelled.num_cache_hits == 200
    measured = table_op_counts(cached, [100], [10.0], [None], hit_rates=[0.5])
    assert measured.num_lookups == 500 and measured.grt_flops < modelled.grt_flops < full.grt_flops
    # The perf estimate prices the hits too: a table whose every lookup hits still reads its rows.
    all_hits = table_op_counts(cached, [100], [10.0], [None], hit_rates=[1.0])
    assert all_hits.num_lookups == 0 and all_hits.grt_flops == 0
    assert tt_compute_ms(all_hits, "grt", 1.0) == (2 * 1000 * 8, 2 * 1000 * 8)
    assert math.isclose(cached.compression_ratio(), cached.dense_bytes() / (cached.storage_bytes() + cached.cache_bytes()))


def test_compiled_fullgraph_traces_both_cache_paths():
    """``torch.compile(fullgraph=True)`` fails on a host read or a data-dependent size. Neither the
    module (on CPU: the cache inside the compiled kernels) nor the trailing-bag split (the CUDA
    path, forced here with ``compact=False``) has one."""
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection([TTEmbeddingBagConfig(
        name="t", num_embeddings=ROWS, embedding_dim=8, feature_names=["f", "g"], tt_p_shapes=[4, 5, 5],
        tt_q_shapes=[2, 2, 2], tt_ranks=[3, 3], cache_rows=4)])
    ebc.populate_cache("t", ids=torch.tensor([2, 4, 6]))
    with torch.no_grad():
        ebc.embedding_bags["t"].cache_weight.mul_(3)
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([2, 3, 4, 6, 6, 9]), lengths=torch.tensor([2, 3, 0, 1]))
    compiled = torch.compile(ebc, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(kjt).values(), ebc(kjt).values())

    bag = ebc.embedding_bags["t"]
    ids, offsets = torch.tensor([2, 3, 4, 6, 6, 9]), torch.tensor([0, 2, 5, 5, 6])

    def split(ids, offsets):
        return cached_tt_embedding_bag(bag.compute_cores(), bag.cache_weight, bag.cache_ids, ids, offsets, None,
                                       bag._pooling, bag.config.variant, compact=False)

    torch.testing.assert_close(torch.compile(split, backend="eager", fullgraph=True)(ids, offsets),
                               bag(ids, offsets))


def test_planner_measures_the_hit_rate_and_the_sharder_sizes_the_cache():
    from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder, measure_group_stats
    from torchrec_tt.tt_shapes import tt_num_params

    cfg = _config(cache_rows=2)
    # Ids 7 (x3) and 9 (x2) are the sample's 2 most frequent: 5 of 8 lookups hit.
    sample = _kjt([7, 9, 7, 1, 9, 7, 2, 60], [3, 5])
    stats = measure_group_stats(cfg, sample)["f"]
    assert stats.hit_rate == pytest.approx(5 / 8) and stats.pooling_factor == 4.0
    expected = count_ops(cfg, torch.tensor([1, 2, 60]), torch.tensor([0, 0, 3]))
    assert stats.groups_per_bag == expected.groups_per_bag
    ebc = TTEmbeddingBagCollection([_config(cache_rows=30)])
    rows = TTEmbeddingBagCollectionSharder().shardable_parameters(ebc)["t"].shape[0]
    assert rows == math.ceil((tt_num_params([4, 5, 5], [2, 2, 2], [3, 3]) + 30 * 8) / 8)


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "trash_bag"])
def test_hits_skip_the_tt_op(compact, monkeypatch):
    """The TT op sees only the misses (compact), or the misses plus one trailing bag of row 0."""
    import torchrec_tt.cache as cache_module

    seen = []

    def recording(cores, ids, offsets, weights, pooling, variant):
        seen.append((ids.clone(), offsets.clone()))
        return real(cores, ids, offsets, weights, pooling=pooling, variant=variant)

    real = cache_module.tt_embedding_bag
    monkeypatch.setattr(cache_module, "tt_embedding_bag", recording)
    bag = _bag()
    cached_tt_embedding_bag(
        bag.compute_cores(), bag.cache_weight, bag.cache_ids, torch.tensor(IDS), torch.tensor(OFFSETS), None,
        bag._pooling, bag.config.variant, compact,
    )
    (ids, offsets), = seen
    misses, miss_offsets = [2, 60, 0, 51], [0, 1, 1, 2, 3, 4]  # IDS without 1, 3, 50, 7, 7, 99
    if compact:
        assert ids.tolist() == misses and offsets.tolist() == miss_offsets
    else:
        assert ids.tolist() == misses + [0] * 6 and offsets.tolist() == miss_offsets + [len(IDS)]


def test_bad_ids_still_reach_the_op_checks():
    """Empty slots never match a looked-up id: with validation off, an id past the table still
    fails in the op (it is not read from an empty slot)."""
    torch.manual_seed(0)
    bag = TTEmbeddingBag(_config(cache_rows=10), validate_inputs=False)
    bag.populate_cache(ids=torch.tensor([1, 2]))
    for bad in (ROWS, ROWS + 5, -1):
        with pytest.raises(ValueError):
            bag(torch.tensor([1, bad]), torch.tensor([0, 2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the cache's sync-free CUDA path")
@pytest.mark.parametrize("variant", ["grt", "tt"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_cuda_cache_is_sync_free_and_matches_the_reference(variant, pooling):
    """On CUDA the split is the trailing-bag form: same values and gradients as the CPU
    reference (float64), and no host sync in forward or backward (validate_inputs off)."""
    cpu = _bag(variant, pooling)
    gpu = _bag(variant, pooling).cuda()
    gpu.validate_inputs = False
    ids, offsets = torch.tensor(IDS), torch.tensor(OFFSETS)
    weights = torch.rand(len(IDS), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = _reference(cpu, ids, offsets, weights, pooling)
    expected.square().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = gpu(ids.cuda(), offsets.cuda(), weights.cuda())
        out.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.cpu(), expected.detach(), rtol=1e-10, atol=1e-10)
    grads = [(p.grad, q.grad) for p, q in zip(gpu.parameters(), cpu.parameters())]
    assert any(g is not None for g, _ in grads)
    for got, want in grads:
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
