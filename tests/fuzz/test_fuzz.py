"""Bad-input fuzz: every case is either equal to the reference or a clear ``ValueError``.

Three deterministic hypothesis tests (``derandomize=True``, no example database, so CI sees
the same cases every run) over the op (``tt_embedding_bag``: cores, indices, offsets,
weights, dtypes, devices, modes), the module (``TTEmbeddingBagCollection`` on KJTs: keys,
lengths, values, weights, dtypes, meta) and the config (``TTEmbeddingBagConfig`` fields).
Each case draws a valid input and at most one mutation that makes it invalid, then
classifies the outcome:

* **equal**: no mutation, and the result equals the reference: rows materialized from the
  cores (``tt_to_dense`` / ``full_weight``) pooled with ``F.embedding_bag`` (on ``meta``:
  the shape);
* **rejected**: a mutation, and a ``ValueError`` whose message matches the mutation's
  patterns (they name the argument, or the table and the feature, and the bad value);
* **silently wrong**: a result for an invalid input, or a result unlike the reference;
* **vague**: a ``ValueError`` for a valid input, or one that does not name the argument
  and the value;
* **crash**: any other exception.

The tallies are printed as one line at the end of the session (``conftest.py``).
"""

import math
import os
import re
from typing import Callable, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType, PoolingType

from torchrec_tt import PoolingMode, TTEmbeddingBag, TTEmbeddingBagCollection, TTEmbeddingBagConfig, Variant, tt_embedding_bag
from tt_testing import embedding_bag_ref, problems, tolerances

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


def _mutation_id(mutation) -> str:
    return mutation[0] if isinstance(mutation, tuple) else str(mutation)


def _dtype_pattern(dtype: torch.dtype) -> str:
    """Python prints ``torch.float32``, C++ ``Float``."""
    cpp = {torch.float32: "Float", torch.float64: "Double", torch.int64: "Long", torch.int32: "Int"}[dtype]
    return rf"({re.escape(str(dtype))}|\b{cpp}\b)"


def _shape_pattern(shape: Sequence[int]) -> str:
    """``(6, 1)`` from Python, ``[6, 1]`` from C++."""
    inner = ", ".join(str(s) for s in shape)
    return rf"[\[(]{re.escape(inner)},?[\])]"


def _run(stats, kind: str, call: Callable, patterns: Optional[List[str]], check: Callable, failures: List[str], what: str) -> None:
    stats["cases"] += 1
    stats[kind] += 1
    try:
        out = call()
    except ValueError as err:
        message = str(err)
        if patterns is not None and all(re.search(p, message) for p in patterns):
            stats["rejected"] += 1
        else:
            stats["vague"] += 1
            failures.append(f"vague: {what}: {message!r} (expected {patterns})")
        return
    except Exception as err:  # noqa: BLE001 - a crash is what this test looks for
        stats["crashes"] += 1
        failures.append(f"crash: {what}: {type(err).__name__}: {err}")
        return
    if patterns is not None:
        stats["silently wrong"] += 1
        failures.append(f"silently wrong: {what}: accepted, expected a ValueError matching {patterns}")
        return
    problem = check(out)
    if problem:
        stats["silently wrong"] += 1
        failures.append(f"silently wrong: {what}: {problem}")
    else:
        stats["equal"] += 1


def _close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    if out.device.type == "meta" or expected.device.type == "meta":
        return None if (out.shape, out.dtype) == (expected.shape, expected.dtype) else f"meta {out.shape} != {expected.shape}"
    try:
        torch.testing.assert_close(out.cpu(), expected.cpu(), **tolerances(dtype))
    except AssertionError as err:
        return str(err).splitlines()[0]
    return None


# ---------------------------------------------------------------------------------------
# Op: tt_embedding_bag
# ---------------------------------------------------------------------------------------

OP_MUTATIONS = [
    None,  # valid inputs
    "index_high", "index_negative", "offsets_first", "offsets_last", "offsets_decreasing",
    "weights_non_finite", "weights_length", "weights_dtype", "indices_float", "indices_2d",
    "offsets_float", "offsets_empty", "core_rank", "core_dtype", "cores_int", "num_cores",
    "pooling_name", "variant_name",
]
_CUDA_CHECKS_VALUES = os.environ.get("TORCHREC_TT_CHECK_BOUNDS", "0") == "1"
_VALUE_MUTATIONS = {"index_high", "index_negative", "offsets_first", "offsets_last", "offsets_decreasing", "weights_non_finite"}


def _op_case(problem, dtype, index_dtype, weighted, pooling, variant, device, mutation, data, fuzz_stats):
    cores, indices, offsets, psw = problem.tensors(dtype=dtype, index_dtype=index_dtype, weighted=weighted)
    rows, lookups, bags = problem.num_rows, indices.numel(), offsets.numel() - 1
    reference = embedding_bag_ref(cores, indices, offsets, psw, pooling=str(PoolingMode.parse(pooling)))
    if mutation in _VALUE_MUTATIONS and (device == "meta" or (device == "cuda" and not _CUDA_CHECKS_VALUES)):
        mutation = None  # values are not read on meta, nor on CUDA without the opt-in bounds check
    patterns: Optional[List[str]] = None
    draw = data.draw
    if mutation in ("index_high", "index_negative") and lookups:
        k = draw(st.integers(0, lookups - 1), label="k")
        v = rows + draw(st.integers(0, 3)) if mutation == "index_high" else -draw(st.integers(1, 5))
        indices[k] = v
        patterns = [rf"indices\[{k}\]", rf"got {v}$"]
    elif mutation == "offsets_first" and bags:
        v = draw(st.integers(1, 3))
        offsets[0] = v
        patterns = [r"offsets\[0\]", rf"got {v}$"]
    elif mutation == "offsets_last" and bags:
        v = lookups + draw(st.integers(1, 3))
        offsets[-1] = v
        patterns = [r"offsets\[-1\]", rf"got {v}$"]
    elif mutation == "offsets_decreasing" and bags >= 2:
        j = draw(st.integers(1, bags - 1))
        offsets[j] = offsets[j + 1] + 1
        patterns = [r"non-decreasing", rf"offsets\[{j}\] = {int(offsets[j])} > offsets\[{j + 1}\] = {int(offsets[j + 1])}"]
    elif mutation == "weights_non_finite" and weighted and lookups:
        k = draw(st.integers(0, lookups - 1))
        v = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        psw[k] = v
        patterns = [rf"per_sample_weights\[{k}\]", rf"got {v}$"]
    elif mutation == "weights_length":
        psw = torch.ones(lookups + 1, dtype=dtype)
        patterns = [r"per_sample_weights", _shape_pattern([lookups + 1])]
    elif mutation == "weights_dtype":
        other = torch.float64 if dtype == torch.float32 else torch.float32
        psw = torch.ones(lookups, dtype=other)
        patterns = [r"per_sample_weights", _dtype_pattern(other)]
    elif mutation == "indices_float":
        indices = indices.to(torch.float32)
        patterns = [r"indices must be int32 or int64", _dtype_pattern(torch.float32)]
    elif mutation == "indices_2d":
        indices = indices.reshape(lookups, 1)
        patterns = [r"indices must be 1-D", _shape_pattern([lookups, 1])]
    elif mutation == "offsets_float":
        offsets = offsets.to(torch.float32)
        patterns = [r"offsets", _dtype_pattern(torch.float32)]
    elif mutation == "offsets_empty":
        offsets = offsets[:0]
        patterns = [r"offsets must have B \+ 1 >= 1 entries", r"got 0$"]
    elif mutation == "core_rank":
        k = draw(st.integers(1, len(cores) - 1))
        m, r, n, r_out = cores[k].shape
        cores[k] = torch.zeros(m, r + 1, n, r_out, dtype=dtype)
        patterns = [rf"rank mismatch: cores\[{k}\]\.size\(1\) must equal cores\[{k - 1}\]\.size\(3\) = {r}, got {r + 1}$"]
    elif mutation == "core_dtype":
        k = draw(st.integers(1, len(cores) - 1))
        other = torch.float64 if dtype == torch.float32 else torch.float32
        cores[k] = cores[k].to(other)
        patterns = [rf"cores\[{k}\] must have the dtype of cores\[0\]", rf"got {_dtype_pattern(other)}$"]
    elif mutation == "cores_int":
        cores = [c.to(torch.int64) for c in cores]
        patterns = [r"cores must be", _dtype_pattern(torch.int64)]
    elif mutation == "num_cores":
        cores = cores[:1]
        patterns = [r"cores must hold 2 to 4 cores, got 1$"]
    elif mutation == "pooling_name":
        pooling = draw(st.sampled_from(["max", "none", 7]))
        patterns = [r"^tt_embedding_bag: pooling must be one of", rf"got {re.escape(repr(pooling))}$"]
    elif mutation == "variant_name":
        variant = draw(st.sampled_from(["fast", "", 2]))
        patterns = [r"^tt_embedding_bag: variant must be one of", rf"got {re.escape(repr(variant))}$"]
    else:
        mutation = None  # its precondition does not hold (e.g. no lookups): a valid case
    moved = [c.to(device) for c in cores], indices.to(device), offsets.to(device), None if psw is None else psw.to(device)
    what = f"op {mutation or 'valid'} {problem} {dtype} {index_dtype} weighted={weighted} {pooling!r} {variant!r} {device}"
    failures: List[str] = []
    _run(
        fuzz_stats, "op", lambda: tt_embedding_bag(*moved, pooling=pooling, variant=variant), patterns,
        lambda out: _close(out, reference.to(device), dtype), failures, what,
    )
    assert not failures, failures[0]


OP_INPUTS = dict(
    problem=problems(max_batch=4, max_len=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    weighted=st.booleans(),
    pooling=st.sampled_from(["sum", "mean", PoolingMode.SUM, PoolingMode.MEAN, PoolingType.MEAN]),
    variant=st.sampled_from(["tt", "grt", Variant.TT, Variant.GRT, "GRT"]),
    device=st.sampled_from(DEVICES),
    data=st.data(),
)


@pytest.mark.parametrize("mutation", OP_MUTATIONS[1:], ids=_mutation_id)
@settings(FUZZ, max_examples=5)
@given(**OP_INPUTS)
def test_fuzz_op_bad_input(problem, dtype, index_dtype, weighted, pooling, variant, device, mutation, data, fuzz_stats):
    _op_case(problem, dtype, index_dtype, weighted, pooling, variant, device, mutation, data, fuzz_stats)


@settings(FUZZ, max_examples=30)
@given(**OP_INPUTS)
def test_fuzz_op_valid_input(problem, dtype, index_dtype, weighted, pooling, variant, device, data, fuzz_stats):
    _op_case(problem, dtype, index_dtype, weighted, pooling, variant, device, None, data, fuzz_stats)


# ---------------------------------------------------------------------------------------
# Module: TTEmbeddingBagCollection on KJTs
# ---------------------------------------------------------------------------------------

MODULE_MUTATIONS = [
    None,
    "id_high", "id_negative", "length_negative", "extra_values", "missing_values",
    "weights_non_finite", "weights_count", "weights_int", "no_weights", "duplicate_key",
    "values_2d", "values_float", "missing_feature",
]


def _module_tables(draw) -> List[TTEmbeddingBagConfig]:
    users_rows = draw(st.integers(5, 40), label="users_rows")
    items_rows = draw(st.integers(5, 30), label="items_rows")
    pooling = draw(st.sampled_from([PoolingType.SUM, PoolingType.MEAN]), label="pooling")
    return [
        TTEmbeddingBagConfig(name="users", num_embeddings=users_rows, embedding_dim=4, feature_names=["u_a", "u_b"],
                             tt_ranks=[draw(st.integers(1, 3))], tt_num_cores=2, pooling=pooling,
                             variant=draw(st.sampled_from(list(Variant)))),
        # rows 7 * 5 = 35 >= items_rows: padding rows between num_embeddings and 35
        TTEmbeddingBagConfig(name="products", num_embeddings=items_rows, embedding_dim=6, feature_names=["i_a"],
                             tt_p_shapes=[7, 5], tt_q_shapes=[3, 2], tt_ranks=[2], pooling=pooling,
                             variant=draw(st.sampled_from(["tt", "grt"]))),
    ]


def _module_reference(module, tables, keys, ids, lengths, weights, batch):
    """Per feature: the table materialized by full_weight, pooled with F.embedding_bag."""
    out = {}
    for table in tables:
        weight = module.full_weight(table.name)
        for f in table.feature_names:
            idx = torch.tensor(ids[f], dtype=torch.int64)
            off = torch.tensor([0, *_accumulate(lengths[f])], dtype=torch.int64)
            w = None if weights is None else torch.tensor(weights[f], dtype=torch.float32)
            if table.pooling == PoolingType.MEAN:
                bag_len = torch.tensor(lengths[f], dtype=torch.float32).clamp_min(1)
                bag_of = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths[f], dtype=torch.int64))
                w = (torch.ones(idx.numel()) if w is None else w) / bag_len[bag_of]
            out[f] = F.embedding_bag(idx, weight, off, mode="sum", per_sample_weights=w, include_last_offset=True)
    return out


def _accumulate(values: Sequence[int]) -> List[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _module_case(data, weighted, index_dtype, lengths_dtype, batch, extra_key, device, mutation, fuzz_stats):
    draw = data.draw
    torch.manual_seed(0)
    tables = _module_tables(draw)
    table_of = {f: t for t in tables for f in t.feature_names}
    module = TTEmbeddingBagCollection(tables, is_weighted=weighted, device=torch.device(device))
    keys = draw(st.permutations(["u_a", "u_b", "i_a"]), label="keys") + (["zzz"] if extra_key else [])
    rows_of = {f: table_of[f].num_embeddings if f in table_of else 1000 for f in keys}
    lengths = {f: draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch), label=f"len_{f}") for f in keys}
    ids = {f: draw(st.lists(st.integers(0, rows_of[f] - 1), min_size=sum(lengths[f]), max_size=sum(lengths[f])), label=f"ids_{f}")
           for f in keys}
    weights = {f: [float(x) for x in draw(st.lists(st.integers(-4, 8), min_size=len(ids[f]), max_size=len(ids[f])))] for f in keys}
    weights = weights if weighted else None

    def where(f):
        return rf"^table '{table_of[f].name}', feature '{f}'" if f in table_of else rf"^feature '{f}' \(no table\)"

    flat_ids = [i for f in keys for i in ids[f]]
    flat_lengths = [n for f in keys for n in lengths[f]]
    flat_weights = None if weights is None else [w for f in keys for w in weights[f]]
    kjt_keys = list(keys)
    values = torch.tensor(flat_ids, dtype=index_dtype)
    lengths_t = torch.tensor(flat_lengths, dtype=lengths_dtype)
    weights_t = None if flat_weights is None else torch.tensor(flat_weights, dtype=torch.float32)
    patterns: Optional[List[str]] = None
    nonempty = [f for f in keys if f in table_of and ids[f]]
    if device == "meta" and mutation not in (None, "duplicate_key", "values_2d", "values_float", "missing_feature", "no_weights", "weights_int"):
        mutation = None  # values are not read on meta
    if mutation in ("id_high", "id_negative") and nonempty:
        f = draw(st.sampled_from(nonempty))
        k = draw(st.integers(0, len(ids[f]) - 1))
        v = table_of[f].num_embeddings + draw(st.integers(0, 5)) if mutation == "id_high" else -draw(st.integers(1, 3))
        values[sum(len(ids[g]) for g in keys[: keys.index(f)]) + k] = v
        patterns = [where(f), rf"got index {v} at position {k}$"]
    elif mutation == "length_negative" and batch:
        f = draw(st.sampled_from(keys))
        b = draw(st.integers(0, batch - 1))
        lengths_t[keys.index(f) * batch + b] = -1
        patterns = [where(f), rf"bag {b} has length -1$"]
    elif mutation == "extra_values":
        values = torch.cat([values, torch.zeros(2, dtype=index_dtype)])
        patterns = [where(keys[-1]), rf"number of values \({values.numel()}\), got {len(flat_ids)}$"]
    elif mutation == "missing_values" and flat_ids:
        values = values[:-1]
        total, short = 0, None
        for f in keys:
            total += sum(lengths[f])
            if total > values.numel():
                short = f
                break
        patterns = [where(short), rf"at most the number of values \({values.numel()}\), got {total}$"]
    elif mutation == "weights_non_finite" and weighted and nonempty:
        f = draw(st.sampled_from(nonempty))
        k = draw(st.integers(0, len(ids[f]) - 1))
        v = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        weights_t[sum(len(ids[g]) for g in keys[: keys.index(f)]) + k] = v
        patterns = [where(f), rf"must be finite, got {v} at position {k}$"]
    elif mutation == "weights_count" and weighted:
        weights_t = torch.cat([weights_t, torch.ones(1)])
        patterns = [where(keys[-1]), rf"number of weights \({weights_t.numel()}\), got {len(flat_ids)}$"]
    elif mutation == "weights_int" and weighted:
        weights_t = weights_t.to(torch.int64)
        patterns = [r"^table '\w+', feature '\w+': per-sample weights must be floating point", r"got torch.int64$"]
    elif mutation == "no_weights" and weighted:
        weights_t = None
        patterns = [r"^table '\w+', feature '\w+': the module is weighted", r"got None$"]
    elif mutation == "duplicate_key" and len(keys) >= 2:
        i, j = sorted(draw(st.lists(st.integers(0, len(keys) - 1), min_size=2, max_size=2, unique=True)))
        kjt_keys[j] = kjt_keys[i]
        patterns = [where(kjt_keys[i]), rf"keys must be distinct, got '{kjt_keys[i]}' at positions {i} and {j}$"]
    elif mutation == "values_2d":
        values = values.reshape(-1, 1)
        patterns = [r"^table '\w+', feature '\w+': KJT values must be 1-D", _shape_pattern([len(flat_ids), 1]) + "$"]
    elif mutation == "values_float":
        values = values.to(torch.float32)
        patterns = [r"^table '\w+', feature '\w+': KJT values \(ids\) must be int32 or int64", r"got torch.float32$"]
    elif mutation == "missing_feature":
        f = draw(st.sampled_from(["u_a", "u_b", "i_a"]))
        keep = [g for g in keys if g != f]
        kjt_keys = keep
        values = torch.tensor([i for g in keep for i in ids[g]], dtype=index_dtype)
        lengths_t = torch.tensor([n for g in keep for n in lengths[g]], dtype=lengths_dtype)
        if weights_t is not None:
            weights_t = torch.tensor([w for g in keep for w in weights[g]], dtype=torch.float32)
        patterns = [where(f), r"the input KJT must have every table's features"]
    else:
        mutation = None
    kjt = KeyedJaggedTensor(keys=kjt_keys, values=values, lengths=lengths_t, weights=weights_t, stride=batch)
    if device == "meta":
        kjt = kjt.to(torch.device("meta"))
    what = f"module {mutation or 'valid'} keys={kjt_keys} batch={batch} {index_dtype} {lengths_dtype} weighted={weighted} {device}"

    def check(out):
        got = out.to_dict()
        if device == "meta":
            return None if all(got[f].shape == (batch, table_of[f].embedding_dim) for f in table_of) else "meta shapes"
        expected = _module_reference(module, tables, keys, ids, lengths, weights, batch)
        for f in table_of:
            problem = _close(got[f], expected[f], torch.float32)
            if problem:
                return f"feature {f}: {problem}"
        return None

    failures: List[str] = []
    _run(fuzz_stats, "module", lambda: module(kjt), patterns, check, failures, what)
    assert not failures, failures[0]


MODULE_INPUTS = dict(
    data=st.data(),
    weighted=st.booleans(),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    lengths_dtype=st.sampled_from([torch.int32, torch.int64]),
    batch=st.integers(0, 3),
    extra_key=st.booleans(),
    device=st.sampled_from(["cpu", "cpu", "meta"]),
)


@pytest.mark.parametrize("mutation", MODULE_MUTATIONS[1:], ids=_mutation_id)
@settings(FUZZ, max_examples=4)
@given(**MODULE_INPUTS)
def test_fuzz_module_bad_input(data, weighted, index_dtype, lengths_dtype, batch, extra_key, device, mutation, fuzz_stats):
    _module_case(data, weighted, index_dtype, lengths_dtype, batch, extra_key, device, mutation, fuzz_stats)


@settings(FUZZ, max_examples=25)
@given(**MODULE_INPUTS)
def test_fuzz_module_valid_input(data, weighted, index_dtype, lengths_dtype, batch, extra_key, device, fuzz_stats):
    _module_case(data, weighted, index_dtype, lengths_dtype, batch, extra_key, device, None, fuzz_stats)


# ---------------------------------------------------------------------------------------
# Config: TTEmbeddingBagConfig fields
# ---------------------------------------------------------------------------------------

CONFIG_MUTATIONS = [
    None,
    ("num_embeddings", [0, -3, 2.5, True, "10"]),
    ("embedding_dim", [0, -1, 4.0, False]),
    ("tt_p_shapes", [[1, 1], [0, 5], [2.0, 3], [5], [2, 2, 2, 2, 2]]),
    ("tt_q_shapes", [[3, 5], [1, -4], [7]]),
    ("tt_ranks", [[0], [2, 2, 2, 2], [True], [10**7, 10**7, 10**7]]),
    ("variant", ["fast", 3, None, ""]),
    ("pooling", [PoolingType.NONE]),
    ("data_type", [DataType.INT8, DataType.INT4]),
    ("tt_num_cores", [1, 5, "3"]),
    ("feature_names", [["f", "f"], "f", [""]]),
    ("name", [""]),
]


def _config_case(num_embeddings, embedding_dim, num_cores, explicit_ranks, variant, pooling, mutation, data, fuzz_stats):
    args = dict(name="fuzzed", num_embeddings=num_embeddings, embedding_dim=embedding_dim, feature_names=["f"],
                variant=variant, pooling=pooling, tt_num_cores=num_cores)
    if explicit_ranks:
        args["tt_ranks"] = data.draw(st.lists(st.integers(1, 4), min_size=num_cores - 1, max_size=num_cores - 1))
    patterns: Optional[List[str]] = None
    if mutation is not None:
        field, choices = mutation
        value = data.draw(st.sampled_from(choices), label=field)
        if field == "tt_p_shapes" and value == [1, 1] and num_embeddings == 1:
            value = [0, 5]  # [1, 1] covers a single row
        if field == "tt_ranks" and value == [10**7, 10**7, 10**7]:
            value = [10**7] * (num_cores - 1)
            args["tt_num_cores"] = num_cores
        if field == "tt_q_shapes" and math.prod(value) == embedding_dim and len(value) >= 2:
            value = [1, -4]
        args[field] = value
        name = args["name"]
        shown = re.escape(f"{field}={value!r}")
        patterns = [rf"^TTEmbeddingBagConfig '{re.escape(str(name))}': ", shown]
        if field == "tt_ranks" and value[0] >= 10**7:
            patterns.append(r"make cores of \d+ bytes")
    what = f"config {mutation and mutation[0]} {args}"

    def build_and_run():
        cfg = TTEmbeddingBagConfig(**args)
        bag = TTEmbeddingBag(cfg)
        gen = torch.Generator().manual_seed(num_embeddings)
        indices = torch.randint(0, cfg.num_embeddings, (5,), generator=gen)
        offsets = torch.tensor([0, 2, 2, 5])
        return cfg, bag, indices, offsets, bag(indices, offsets)

    def check(result):
        cfg, bag, indices, offsets, out = result
        mode = "mean" if cfg.pooling == PoolingType.MEAN else "sum"
        expected = F.embedding_bag(indices, bag.full_weight(), offsets, mode=mode, include_last_offset=True)
        if cfg.variant is not Variant.parse(variant):
            return f"variant {cfg.variant!r} != {variant!r}"
        return _close(out.detach(), expected, torch.float32)

    failures: List[str] = []
    _run(fuzz_stats, "config", build_and_run, patterns, check, failures, what)
    assert not failures, failures[0]


CONFIG_INPUTS = dict(
    num_embeddings=st.integers(1, 300),
    embedding_dim=st.sampled_from([1, 2, 4, 6, 8]),
    num_cores=st.integers(2, 3),
    explicit_ranks=st.booleans(),
    variant=st.sampled_from(["tt", "grt", Variant.TT, Variant.GRT, "Tt"]),
    pooling=st.sampled_from([PoolingType.SUM, PoolingType.MEAN]),
    data=st.data(),
)


@pytest.mark.parametrize("mutation", CONFIG_MUTATIONS[1:], ids=_mutation_id)
@settings(FUZZ, max_examples=4)
@given(**CONFIG_INPUTS)
def test_fuzz_config_bad_input(num_embeddings, embedding_dim, num_cores, explicit_ranks, variant, pooling, mutation, data, fuzz_stats):
    _config_case(num_embeddings, embedding_dim, num_cores, explicit_ranks, variant, pooling, mutation, data, fuzz_stats)


@settings(FUZZ, max_examples=20)
@given(**CONFIG_INPUTS)
def test_fuzz_config_valid_input(num_embeddings, embedding_dim, num_cores, explicit_ranks, variant, pooling, data, fuzz_stats):
    _config_case(num_embeddings, embedding_dim, num_cores, explicit_ranks, variant, pooling, None, data, fuzz_stats)
