#!/usr/bin/env python3
"""DLRM on Criteo Kaggle (or its synthetic twin) with the largest tables TT-compressed.

TorchRec's ``DLRM`` (dense arch over the 13 integer features, dot interaction of the 26
categorical embeddings, over arch) with one table per categorical feature. With
``--embedding grt`` or ``tt`` the tables of at least ``--tt-threshold-rows`` rows are TT
tables (:class:`torchrec_tt.TTEmbeddingBagCollection`, GRT-GnR or TT-Rec kernel) and the
others stay TorchRec tables (:class:`torchrec_tt.MixedEmbeddingBagCollection`);
``--embedding dense`` keeps every table dense. A comma list trains each kind on the same
data and seed and prints a comparison: per-table bytes and compression, the compression of
the whole embedding layer, time per step, examples/s, held-out AUC and log loss.

Data: ``--data train.txt`` reads Criteo Kaggle's TSV (:mod:`torchrec_tt.data.criteo`;
nothing is downloaded); by default ``--rows`` synthetic samples with Kaggle's cardinalities
(capped at 10M), Zipf ids and a learnable label (``docs/design.md``).

Single process::

    python examples/dlrm_criteo.py --embedding grt,dense          # synthetic, compared
    python examples/dlrm_criteo.py --data ~/criteo/train.txt --data-rows 5000000

N ranks (``DistributedModelParallel``; gloo on CPU, nccl on GPUs)::

    torchrun --nproc_per_node 2 examples/dlrm_criteo.py --embedding grt
    torchx run -s local_cwd launch/components.py:train_criteo -j 1x2 --embedding grt
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

try:
    import torchrec_tt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_tt import MixedEmbeddingBagCollection, TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.data.criteo import (
    CAT_NAMES,
    INT_FEATURE_COUNT,
    CriteoData,
    CriteoSyntheticConfig,
    capped_kaggle_cardinalities,
    generate_criteo,
    read_criteo_tsv,
)
from torchrec_tt.train_utils import (
    Dist,
    Optimizers,
    auc_score,
    embedding_fused_params,
    log_loss,
    parse_embeddings,
    run_kinds,
    table_memory,
    train_steps,
)

EMBEDDINGS = ("grt", "tt", "dense")
DEFAULT_EMB_LR = 1.0  # Adagrad of the TorchRec tables (every kind): best of the README grid for dense
DEFAULT_TT_LR = 0.1  # Adagrad of the TT cores: best of the README grid for grt
DEFAULT_TT_WARMUP_STEPS = 100  # linear warm-up of the cores' rate, unsharded (README: 4-seed AUC gap)


# ----------------------------------------------------------------------------- model
def build_tables(args: argparse.Namespace, embedding: str, cardinalities: Sequence[int],
                 cache_fraction: float = 0.0) -> List[EmbeddingBagConfig]:
    """One table per categorical feature: a ``TTEmbeddingBagConfig`` when ``embedding`` is
    ``grt``/``tt`` and the table has at least ``--tt-threshold-rows`` rows, else a TorchRec
    ``EmbeddingBagConfig``. TT tables keep ``cache_fraction`` of their rows in a hot-row cache
    (``cache_rows``; needs a torchrec_tt with the cache, docs/design.md section 10)."""
    tables: List[EmbeddingBagConfig] = []
    for name, rows in zip(CAT_NAMES, cardinalities):
        common = dict(name=name, num_embeddings=int(rows), embedding_dim=args.embedding_dim, feature_names=[name],
                      pooling=PoolingType.SUM, weight_init_min=-args.init_scale, weight_init_max=args.init_scale)
        if embedding != "dense" and rows >= args.tt_threshold_rows:
            cache = {"cache_rows": int(round(cache_fraction * rows))} if cache_fraction > 0 else {}

            def tt_table(rank: int) -> TTEmbeddingBagConfig:
                return TTEmbeddingBagConfig(**common, tt_num_cores=args.tt_cores, variant=embedding,
                                            tt_ranks=[rank] * (args.tt_cores - 1), **cache)

            if args.tt_min_compression is None:
                tables.append(tt_table(args.tt_rank))
            else:
                tables.append(tt_table(rank_for_compression(tt_table, args.tt_min_compression, name)))
        else:
            tables.append(EmbeddingBagConfig(**common))
    return tables


def rank_for_compression(tt_table: Callable[[int], TTEmbeddingBagConfig], min_compression: float, name: str,
                         max_rank: int = 512) -> int:
    """The largest uniform inner rank ``r <= max_rank`` whose table ``tt_table(r)`` keeps a
    compression (``compression_ratio()``: hot-row cache counted) of at least
    ``min_compression``; raises ``ValueError`` naming the table when not even rank 1 does."""
    if not tt_table(1).compression_ratio() >= min_compression:
        raise ValueError(f"table '{name}': --tt-min-compression {min_compression:g} is out of reach; rank 1 "
                         f"compresses it {tt_table(1).compression_ratio():.1f}x")

    def keeps_it(rank: int) -> bool:
        try:
            return tt_table(rank).compression_ratio() >= min_compression
        except ValueError:  # cores larger than the dense table: far below any useful target
            return False

    lo, hi = 1, max_rank  # compression falls as the rank grows: bisect for the last rank that keeps it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if keeps_it(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def build_sparse_arch(tables: Sequence[EmbeddingBagConfig], sparse_grads: bool) -> nn.Module:
    """TorchRec tables in an ``EmbeddingBagCollection``, TT tables in a
    ``TTEmbeddingBagCollection``; a ``MixedEmbeddingBagCollection`` when there are both.
    ``sparse_grads``: dense tables get sparse row gradients (unsharded training: the
    optimizer touches only the rows of the batch, not all 33M)."""
    tt = [t for t in tables if isinstance(t, TTEmbeddingBagConfig)]
    dense = [t for t in tables if not isinstance(t, TTEmbeddingBagConfig)]
    cpu = torch.device("cpu")
    dense_ebc = EmbeddingBagCollection(tables=dense, device=cpu) if dense else None
    if dense_ebc is not None and sparse_grads:
        for bag in dense_ebc.embedding_bags.values():
            bag.sparse = True
    tt_ebc = TTEmbeddingBagCollection(tt, device=cpu, validate_inputs=False) if tt else None
    if tt_ebc is None or dense_ebc is None:
        return tt_ebc if dense_ebc is None else dense_ebc
    return MixedEmbeddingBagCollection(dense_ebc, tt_ebc, [f for t in tables for f in t.feature_names],
                                       [t.embedding_dim for t in tables for _ in t.feature_names])


def build_model(args: argparse.Namespace, tables: Sequence[EmbeddingBagConfig], sparse_grads: bool) -> DLRM:
    """TorchRec's ``DLRM`` over the tables (it takes any ``EmbeddingBagCollectionInterface``-like
    module with ``embedding_bag_configs()``)."""
    return DLRM(embedding_bag_collection=build_sparse_arch(tables, sparse_grads), dense_in_features=INT_FEATURE_COUNT,
                dense_arch_layer_sizes=[*args.dense_arch, args.embedding_dim], over_arch_layer_sizes=[*args.over_arch, 1])


def has_cache() -> bool:
    """Whether this torchrec_tt has the hot-row cache (``TTEmbeddingBagConfig.cache_rows``)."""
    return "cache_rows" in {f.name for f in dataclasses.fields(TTEmbeddingBagConfig)}


def _cached_tables(model: nn.Module) -> List[Any]:
    """``(collection, table config)`` of every TT table with a hot-row cache."""
    return [(m, t) for m in model.modules() if isinstance(m, TTEmbeddingBagCollection)
            for t in m.embedding_bag_configs() if getattr(t, "cache_rows", 0) > 0]


def warm_up(model: nn.Module, train: CriteoData, args: argparse.Namespace) -> Dict[str, Any]:
    """Before training: fill every TT table's hot-row cache with its most frequent ids in
    ``train`` (the counts given by the user, as TT-Rec populates offline). Returns the cached
    ids per table."""
    cached = {}
    for collection, table in _cached_tables(model):
        ids = train.sparse[:, CAT_NAMES.index(table.feature_names[0])]
        collection.populate_cache(table.name, counts=torch.bincount(ids, minlength=table.num_embeddings))
        cached[table.name] = collection.embedding_bags[table.name].cached_rows().cpu()
    return cached


def cache_hits(cached: Dict[str, torch.Tensor], data: CriteoData, tables: Sequence[EmbeddingBagConfig]) -> Dict[str, float]:
    """Share of the TT tables' lookups in ``data`` that their caches serve (the TT lookups
    removed), overall and per table."""
    out: Dict[str, float] = {}
    hits = lookups = 0
    for t in tables:
        if isinstance(t, TTEmbeddingBagConfig):
            ids = data.sparse[:, CAT_NAMES.index(t.feature_names[0])]
            h = int(torch.isin(ids, cached[t.name]).sum()) if t.name in cached else 0
            out[t.name] = h / max(1, ids.numel())
            hits, lookups = hits + h, lookups + ids.numel()
    out["all_tt"] = hits / max(1, lookups)
    return out


def shard_model(model: DLRM, tables: Sequence[EmbeddingBagConfig], emb_lr: float, tt_lr: float, batch_size: int,
                env: Dist, sample: KeyedJaggedTensor, cache_lr: Optional[float] = None) -> nn.Module:
    """``DistributedModelParallel``: every table table-wise on one rank (TorchRec's sharder for
    the dense tables at ``emb_lr``, ours for the TT ones at ``tt_lr``, one TT-aware planner for
    both; the tables' Adagrad fused into backward), the MLPs data parallel."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv, ShardingType

    from torchrec_tt.distributed import ShmDataParallelWrapper, TTEmbeddingBagCollectionSharder, make_tt_planner

    topology = Topology(world_size=env.world_size, compute_device=env.device.type, local_world_size=env.world_size)
    constraints = {t.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value], pooling_factors=[1.0])
                   for t in tables}
    sharders = [EmbeddingBagCollectionSharder(fused_params=embedding_fused_params(emb_lr)),
                TTEmbeddingBagCollectionSharder(fused_params=embedding_fused_params(tt_lr, cache_lr))]
    planner = make_tt_planner(topology, batch_size=batch_size, constraints=constraints, sample_batch=sample)
    plan = planner.collective_plan(model, sharders, env.pg)
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(env.pg), device=env.device,
                                    data_parallel_wrapper=ShmDataParallelWrapper(),
                                    plan=plan, sharders=sharders)


# ----------------------------------------------------------------------------- run
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--embedding", type=lambda text: parse_embeddings(text, EMBEDDINGS), default=["grt"],
                   help="grt | tt (TT kernel variants for the large tables) | dense (TorchRec tables only); "
                        "a comma list such as grt,dense trains each on the same data and seed")
    p.add_argument("--data", default=None, help="Criteo Kaggle train.txt (TSV); default: synthetic data")
    p.add_argument("--data-rows", type=int, default=None, help="read at most this many samples of --data")
    p.add_argument("--rows", type=int, default=CriteoSyntheticConfig.num_rows, help="synthetic samples")
    p.add_argument("--max-cardinality", type=int, default=10_000_000,
                   help="rows of the largest tables (Kaggle's cardinalities capped at this)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held-out share (the last samples)")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--tt-threshold-rows", type=int, default=1_000_000,
                   help="tables with at least this many rows are TT (grt/tt); Kaggle: the 5 largest")
    p.add_argument("--tt-rank", type=int, default=32, help="every inner TT rank")
    p.add_argument("--tt-min-compression", type=float, default=None,
                   help="instead of --tt-rank: per TT table, the largest uniform inner rank whose compression "
                        "(hot-row cache counted) stays at least this, e.g. 100")
    p.add_argument("--tt-cores", type=int, default=3)
    p.add_argument("--init-scale", type=float, default=0.05, help="uniform init range of every table (TT: same variance)")
    p.add_argument("--dense-arch", type=ints, default=[64], help="hidden sizes of the dense arch (then embedding-dim)")
    p.add_argument("--over-arch", type=ints, default=[256, 64], help="hidden sizes of the over arch (then 1)")
    p.add_argument("--batch-size", type=int, default=2048, help="per rank (2048: best for grt in the README grid)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the MLPs")
    p.add_argument("--emb-lr", type=float, default=DEFAULT_EMB_LR,
                   help="Adagrad learning rate of the TorchRec (uncompressed) tables, in every --embedding kind")
    p.add_argument("--tt-lr", type=float, default=DEFAULT_TT_LR, help="Adagrad learning rate of the TT cores")
    p.add_argument("--tt-warmup-steps", type=int, default=None,
                   help=f"the TT cores' rate rises linearly to --tt-lr over this many steps (default "
                        f"{DEFAULT_TT_WARMUP_STEPS} on 1 rank; 0: constant; N ranks: constant, their Adagrad is fused "
                        "into backward, and a value > 0 raises)")
    p.add_argument("--cache-lr", type=float, default=None,
                   help="Adagrad learning rate of the TT tables' cached rows (default: --emb-lr, as they are "
                        "uncompressed rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: OMP_NUM_THREADS if set, else cores / local ranks)")
    p.add_argument("--json", default=None, help="write the results to this JSON file (rank 0)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--cache-fraction", type=_fractions, default=[0.0],
                   help="share of each TT table's rows in its hot-row cache, filled with the most frequent "
                        "training ids; a comma list (e.g. 0,0.001,0.01,0.05) trains each on the same data and seed")
    return p.parse_args(argv)


def _fractions(text: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of fractions in [0, 1]")
    return values


def load_data(args: argparse.Namespace, say: Callable[..., None]) -> Dict[str, Any]:
    """The train/test split every embedding kind uses, and its statistics."""
    t0 = time.perf_counter()
    cards = capped_kaggle_cardinalities(args.max_cardinality)
    if args.data:
        data = read_criteo_tsv(args.data, cards, max_rows=args.data_rows)
    else:
        data = generate_criteo(CriteoSyntheticConfig(num_rows=args.rows, cardinalities=cards, seed=args.seed))
    train, test = data.split(args.test_fraction)
    stats = {"source": args.data or "synthetic", **data.stats(), "seconds": time.perf_counter() - t0}
    say(f"data: {stats['source']}: {len(train)} train + {len(test)} test samples, positive rate "
        f"{stats['positive_rate']:.3f}, {stats['rows'] / 1e6:.1f}M table rows; the top 1 % ids of the largest "
        f"table take {100 * stats['largest_table_top1pct_share']:.0f} % of its lookups ({stats['seconds']:.1f} s)")
    return {"train": train, "test": test, "stats": stats}


def _train_batches(train: CriteoData, args: argparse.Namespace, env: Dist):
    """This rank's slice of every global batch, epoch after epoch (the same permutation on
    every rank)."""
    global_batch = args.batch_size * env.world_size
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for s in range(len(train) // global_batch):
            yield train.batch(order[s * global_batch + env.rank * args.batch_size:][: args.batch_size])


def tt_warmup_steps(args: argparse.Namespace, world_size: int) -> int:
    """The TT cores' warm-up steps: ``--tt-warmup-steps``, by default ``DEFAULT_TT_WARMUP_STEPS``
    on 1 rank and 0 on N ranks (the sharded tables' Adagrad is fused into backward at a
    constant rate); ``ValueError`` for a warm-up asked for on N ranks or a negative one."""
    steps = args.tt_warmup_steps
    if steps is None:
        return DEFAULT_TT_WARMUP_STEPS if world_size == 1 else 0
    if steps < 0 or (steps > 0 and world_size > 1):
        raise ValueError(f"--tt-warmup-steps {steps}: expected >= 0, and 0 with {world_size} ranks (sharded tables "
                         "step their Adagrad in backward at a constant rate)")
    return steps


def train_and_evaluate(args: argparse.Namespace, embedding: str, env: Dist, data: Dict[str, Any],
                       say: Callable[..., None], cache_fraction: float = 0.0) -> Dict[str, Any]:
    """Build, (shard,) train and evaluate one model; returns its results."""
    train, test = data["train"], data["test"]
    emb_lr, tt_lr = args.emb_lr, (args.tt_lr if embedding != "dense" else None)
    cache_lr = args.cache_lr if args.cache_lr is not None else emb_lr
    tt_warmup = tt_warmup_steps(args, env.world_size)
    results: Dict[str, Any] = {"embedding": embedding, "emb_lr": emb_lr, "tt_lr": tt_lr,
                               "tt_warmup_steps": tt_warmup if embedding != "dense" else None, "world_size": env.world_size,
                               "backend": env.backend, "device": str(env.device), "args": vars(args),
                               "data": data["stats"]}
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # same initial MLPs whatever ran before
    tables = build_tables(args, embedding, train.cardinalities, cache_fraction)
    results["tables"] = table_memory(tables)
    model: nn.Module = build_model(args, tables, sparse_grads=env.world_size == 1)
    cached = warm_up(model, train, args)
    if cached:
        results["cache"] = {"fraction": cache_fraction, "lr": cache_lr, "rows": {n: len(c) for n, c in cached.items()},
                            "train_hit_rate": cache_hits(cached, train, tables),
                            "test_hit_rate": cache_hits(cached, test, tables)}
    global_batch = args.batch_size * env.world_size
    if env.world_size > 1:
        model = shard_model(model, tables, emb_lr, args.tt_lr, args.batch_size, env,
                            train.batch(torch.arange(args.batch_size))[1], cache_lr)
    else:
        model = model.to(env.device)
    optimizer = Optimizers(model, args.lr, emb_lr, cache_lr, tt_lr=args.tt_lr, tt_warmup_steps=tt_warmup)
    results["build_seconds"] = time.perf_counter() - t0

    # ---- train: every rank takes its slice of each global batch (same permutation everywhere)
    steps_per_epoch = len(train) // global_batch
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    say(f"train {embedding}: {total_steps} steps of {env.world_size} x {args.batch_size} examples "
        f"({env.world_size} rank(s), {env.backend}, {torch.get_num_threads()} thread(s) per rank)")
    results["train"] = train_steps(model, optimizer, _train_batches(train, args, env), total_steps, env.device,
                                   global_batch, show_progress=not args.no_progress and env.is_main)

    # ---- evaluate: equal chunks per rank (padded), logits gathered on every rank
    model.eval()
    chunk = -(-len(test) // env.world_size)
    logits_all, t_eval = [], time.perf_counter()
    with torch.no_grad():
        for start in range(env.rank * chunk, (env.rank + 1) * chunk, args.batch_size):
            index = torch.arange(start, min(start + args.batch_size, (env.rank + 1) * chunk)).clamp_(max=len(test) - 1)
            dense, sparse, _ = test.batch(index)
            logits_all.append(model(dense.to(env.device), sparse.to(env.device)).squeeze(1).float())
    logits = env.all_gather(torch.cat(logits_all)).cpu()
    logits = torch.cat([logits[r * chunk:(r + 1) * chunk][: max(0, len(test) - r * chunk)] for r in range(env.world_size)])
    results["eval"] = {"examples": len(test), "seconds": time.perf_counter() - t_eval,
                       "auc": auc_score(logits, test.labels), "log_loss": log_loss(logits, test.labels),
                       "base_log_loss": log_loss(torch.full_like(test.labels, float(torch.logit(train.labels.mean()))),
                                                 test.labels)}
    results["seconds"] = time.perf_counter() - t0
    return results


def run(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Train and evaluate every ``--embedding`` kind on the same data; results by kind."""
    torch.sparse.check_sparse_tensor_invariants.disable()  # Adagrad's sparse row updates: well-formed by construction
    if any(f > 0 for f in args.cache_fraction) and not has_cache():
        raise ValueError(f"--cache-fraction {args.cache_fraction}: this torchrec_tt has no hot-row cache "
                         "(TTEmbeddingBagConfig.cache_rows)")
    return run_kinds(args, load_data, train_and_evaluate, format_report, format_comparison, variants=_variants)


def _variants(args: argparse.Namespace) -> List[Any]:
    """``(name, embedding, kwargs)``: every kind, TT kinds at every ``--cache-fraction``."""
    out = []
    for embedding in args.embedding:
        fractions = args.cache_fraction if embedding != "dense" else [0.0]
        for f in fractions:
            name = embedding if len(fractions) == 1 and f == 0 else f"{embedding}+cache{f:g}"
            out.append((name, embedding, {"cache_fraction": f}))
    return out


def layer_totals(r: Dict[str, Any]) -> Dict[str, float]:
    """Bytes of the whole embedding layer, stored and dense, and its compression; the
    smallest compression among the TT tables (``inf`` without TT tables)."""
    stored = sum(t["bytes"] for t in r["tables"])
    dense = sum(t["dense_bytes"] for t in r["tables"])
    tt = [t["compression"] for t in r["tables"] if t["ranks"] is not None]
    return {"bytes": stored, "dense_bytes": dense, "compression": dense / stored,
            "min_tt_compression": min(tt) if tt else float("inf")}


def format_report(r: Dict[str, Any]) -> str:
    lines = ["", f"== {r['embedding']} | {r['world_size']} rank(s) ({r['backend']}) | table lr {r['emb_lr']}"
             + (f", TT cores lr {r['tt_lr']}" if r.get("tt_lr") is not None else "")
             + (f" (warm-up {r['tt_warmup_steps']} steps)" if r.get("tt_warmup_steps") else "") + " | "
             f"data: {r['data']['source']}"]
    lines.append(f"{'table':<7} {'rows':>9} {'TT rows (p)':<16} {'ranks':<9} {'MiB':>9} {'dense MiB':>10} {'compression':>11}")
    for t in r["tables"]:
        if t["ranks"] is None and t["rows"] < 100_000:
            continue  # small dense tables: in the total only
        lines.append(f"{t['table']:<7} {t['rows']:>9} {str(t['shape'] or '-'):<16} {str(t['ranks'] or '-'):<9} "
                     f"{t['bytes'] / 2**20:>9.2f} {t['dense_bytes'] / 2**20:>10.2f} {t['compression']:>10.1f}x")
    tot = layer_totals(r)
    lines.append(f"{'all 26':<7} {sum(t['rows'] for t in r['tables']):>9} {'':<16} {'':<9} {tot['bytes'] / 2**20:>9.2f} "
                 f"{tot['dense_bytes'] / 2**20:>10.2f} {tot['compression']:>10.1f}x")
    c = r.get("cache")
    if c:
        lines.append(f"hot-row cache: {c['fraction']:g} of each TT table's rows ({sum(c['rows'].values())} rows, lr {c['lr']}); "
                     f"TT lookups served by it: {100 * c['train_hit_rate']['all_tt']:.1f} % in training, "
                     f"{100 * c['test_hit_rate']['all_tt']:.1f} % in the test data")
    t, e = r["train"], r["eval"]
    lines.append(f"train: {t['steps']} steps in {t['seconds']:.1f} s = {t['ms_per_step']:.1f} ms/step, "
                 f"{t['examples_per_second']:.0f} examples/s, loss {t['first_loss']:.4f} -> {t['final_loss']:.4f}")
    lines.append(f"eval: AUC {e['auc']:.4f}, log loss {e['log_loss']:.4f} (constant predictor {e['base_log_loss']:.4f}) "
                 f"on {e['examples']} held-out samples; built, trained and evaluated in {r['seconds']:.1f} s")
    return "\n".join(lines)


def format_comparison(results: Dict[str, Dict[str, Any]]) -> str:
    """One line per embedding kind: same data, seed and steps."""
    lines = ["", f"{'embedding':<14} {'tables MiB':>10} {'layer compr.':>12} {'TT compr. (min)':>15} {'ms/step':>8} "
                 f"{'examples/s':>10} {'AUC':>7} {'log loss':>8} {'cache hits':>10}"]
    for name, r in results.items():
        tot = layer_totals(r)
        lines.append(f"{name:<14} {tot['bytes'] / 2**20:>10.2f} {tot['compression']:>11.1f}x "
                     f"{tot['min_tt_compression']:>14.1f}x {r['train']['ms_per_step']:>8.1f} "
                     f"{r['train']['examples_per_second']:>10.0f} {r['eval']['auc']:>7.4f} {r['eval']['log_loss']:>8.4f} "
                     f"{100 * r['cache']['test_hit_rate']['all_tt'] if 'cache' in r else 0:>9.1f}%")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
