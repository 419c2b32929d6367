#!/usr/bin/env python3
"""DLRM-style liked-item prediction on MovieLens-20M (or its synthetic twin) with TT tables.

The user's liked history is one embedding bag (feature ``history``, mean pooling), the
candidate item another (feature ``candidate``); both go through TT tables
(``--embedding grt`` or ``tt``, :class:`torchrec_tt.TTEmbeddingBagCollection`) or through
TorchRec's ``EmbeddingBagCollection`` (``--embedding dense``). A small dense arch embeds
``log(1 + history length)``; the interaction concatenates the three vectors and their
pairwise dot products; an MLP gives the logit of "liked". Labels: held-out likes versus
sampled negatives (:mod:`torchrec_tt.data.task`).

Item ids are renumbered from training data (default ``--renumber cluster``: co-liked items
get neighbouring ids, hot items first in each cluster, so bags touch fewer TT groups and
similar items share TT core slices; ``freq``: by frequency only); the mapping is a buffer
of the model (``renumber.mapping``). The run prints per-table memory and compression, P and
P_G before/after renumbering, eval AUC and throughput.

Hot-row cache (``--cache-fraction``, TT only; docs/design.md, section 9): each TT table keeps
that share of its rows uncompressed; accesses are counted for ``--cache-warmup-steps``, then the
most accessed rows are cached. The run prints the cache hit rate in training and evaluation,
the TT lookups and work removed, and the history table's forward+backward time with and
without the cache on the same batches. A comma list (``0,0.001,0.01,0.05``) compares sizes.

Single process::

    python examples/dlrm_movielens.py --embedding grt            # synthetic ML-20M twin
    python examples/dlrm_movielens.py --embedding grt,tt,dense   # same data and seed, compared
    python examples/dlrm_movielens.py --movielens ~/ml-20m/ratings.csv

N ranks (``DistributedModelParallel``; gloo on CPU, nccl on GPUs)::

    torchrun --nproc_per_node 2 examples/dlrm_movielens.py --embedding grt
    torchx run -s local_cwd launch/components.py:train -j 1x2 --embedding grt
"""

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

try:
    import torchrec_tt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.data.movielens import load_movielens
from torchrec_tt.data.renumber import FeatureRenumbering, cluster_renumbering, frequency_renumbering, group_stats
from torchrec_tt.data.synthetic import SyntheticConfig, generate_liked_items
from torchrec_tt.data.task import CANDIDATE, HISTORY, LikedTask
from torchrec_tt.train_utils import (  # noqa: F401
    Dist,
    Optimizers,
    auc_score,
    embedding_fused_params,
    run_kinds,
    table_memory,
    train_steps,
)

EMBEDDINGS = ("grt", "tt", "dense")
DEFAULT_EMB_LR = {"dense": 1.0, "grt": 0.03, "tt": 0.03}  # Adagrad; best of the grids in README
RENUMBERINGS = ("cluster", "freq", "none")


# ----------------------------------------------------------------------------- model
class DLRMLike(nn.Module):
    """History bag + candidate embeddings, dense arch, dot/concat interaction, over arch.

    Args:
        embedding_bag_collection (nn.Module): ``EmbeddingBagCollection`` or
            ``TTEmbeddingBagCollection`` with features ``history`` and ``candidate``
            (same ``embedding_dim`` D).
        renumber (Optional[FeatureRenumbering]): id mapping applied to the input KJT.
        dense_in_features (int): dense features per example.
        over_arch (Sequence[int]): hidden sizes of the over arch.
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        renumber: Optional[FeatureRenumbering] = None,
        dense_in_features: int = 1,
        over_arch: Sequence[int] = (128, 64),
    ) -> None:
        super().__init__()
        configs = embedding_bag_collection.embedding_bag_configs()
        dim = configs[0].embedding_dim
        self._features = [f for c in configs for f in c.feature_names]
        num_vectors = 1 + len(self._features)
        self.renumber = renumber
        self.sparse_arch = embedding_bag_collection
        self.dense_arch = nn.Sequential(nn.Linear(dense_in_features, dim), nn.ReLU())
        layers: List[nn.Module] = []
        width = num_vectors * dim + num_vectors * (num_vectors - 1) // 2  # vectors and pairwise dots
        for hidden in over_arch:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.over_arch = nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``(B, dense_in_features)`` and a KJT -> ``(B,)`` logits."""
        if self.renumber is not None:
            sparse = self.renumber(sparse)
        pooled = self.sparse_arch(sparse).to_dict()
        vectors = torch.stack([self.dense_arch(dense)] + [pooled[k] for k in self._features], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))
        i, j = torch.triu_indices(vectors.shape[1], vectors.shape[1], offset=1, device=dots.device)
        x = torch.cat([vectors.flatten(1), dots[:, i, j]], dim=1)
        return self.over_arch(x).squeeze(1)


def make_tables(args: argparse.Namespace, embedding: str, num_items: int,
                cache_fraction: float = 0.0) -> List[EmbeddingBagConfig]:
    """Item tables (TT configs unless ``embedding == "dense"``): one per feature
    (``--tables separate``) or one for both (``shared``; mean pooling, the candidate bag
    has one id)."""
    if args.tables == "shared":
        layout = [("item", [HISTORY, CANDIDATE], PoolingType.MEAN)]
    else:
        layout = [(HISTORY, [HISTORY], PoolingType.MEAN), (CANDIDATE, [CANDIDATE], PoolingType.SUM)]
    tables: List[EmbeddingBagConfig] = []
    for name, features, pooling in layout:
        common = dict(name=name, num_embeddings=num_items, embedding_dim=args.embedding_dim,
                      feature_names=features, pooling=pooling,
                      weight_init_min=-args.init_scale, weight_init_max=args.init_scale)
        if embedding == "dense":
            tables.append(EmbeddingBagConfig(**common))
        else:
            tables.append(TTEmbeddingBagConfig(
                **common,
                tt_p_shapes=list(args.tt_p_shapes or []),
                tt_ranks=[args.tt_rank] * (args.tt_cores - 1),
                tt_num_cores=args.tt_cores,
                variant=embedding,
                data_type=DataType[args.tt_data_type.upper()],
                cache_rows=int(round(cache_fraction * num_items)),
            ))
    return tables


# ----------------------------------------------------------------------------- distributed
SHARDINGS = {"tw": ["table_wise"], "dp": ["data_parallel"], "auto": ["table_wise", "data_parallel"]}


def shard_model(model: DLRMLike, embedding: str, emb_lr: float, batch_size: int, env: Dist,
                tables: Sequence[EmbeddingBagConfig], sample: KeyedJaggedTensor,
                pooling_factors: Dict[str, float], sharding: str = "auto",
                cache_lr: Optional[float] = None) -> Tuple[nn.Module, Dict[str, str]]:
    """``DistributedModelParallel``: TT tables table-wise or data-parallel as ``sharding``
    says (``auto``: the planner's choice from cost), regular tables table-wise (their
    optimizer fused into backward), the rest data parallel. Returns the model and each
    table's sharding type."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    from torchrec_tt.distributed import ShmDataParallelWrapper

    # Topology of torchrun's launch: nnodes x nproc_per_node (LOCAL_WORLD_SIZE).
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    topology = Topology(world_size=env.world_size, compute_device=env.device.type, local_world_size=local_world_size)
    types = SHARDINGS[sharding] if embedding != "dense" else SHARDINGS["tw"]
    constraints = {t.name: ParameterConstraints(sharding_types=types,
                                                pooling_factors=[pooling_factors[f] for f in t.feature_names])
                   for t in tables}
    if embedding == "dense":
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        sharders = [EmbeddingBagCollectionSharder(fused_params=embedding_fused_params(emb_lr))]
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    else:
        from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder, make_tt_planner

        sharders = [TTEmbeddingBagCollectionSharder(fused_params=embedding_fused_params(emb_lr, cache_lr))]
        planner = make_tt_planner(topology, batch_size=batch_size, constraints=constraints,
                                  sample_batch=model.renumber(sample) if model.renumber is not None else sample)
    plan = planner.collective_plan(model, sharders, env.pg)
    chosen = {name: p.sharding_type for name, p in plan.plan["sparse_arch"].items()}
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(env.pg), device=env.device,
                                    data_parallel_wrapper=ShmDataParallelWrapper(),
                                    plan=plan, sharders=sharders), chosen


class TTComputeTimer:
    """Per-rank wall time of the TT lookups' forward and backward during training.

    Forward: around each TT lookup module (the sharded lookups, or the unsharded
    collection). Backward: from the first gradient reaching a lookup's output to the last
    core gradient accumulated (the TT backward ops; on CPU they run synchronously). The
    all-to-alls, the data-parallel all-reduce and the optimizer step are outside both.
    """

    def __init__(self, model: nn.Module) -> None:
        from torchrec_tt.distributed.sharded_module import TTGroupedPooledEmbeddingsLookup

        modules = [m for m in model.modules() if isinstance(m, TTGroupedPooledEmbeddingsLookup)]
        if not modules:
            modules = [m for m in model.modules() if isinstance(m, TTEmbeddingBagCollection)]
        self.forward_s = self.backward_s = 0.0
        self.steps = 0
        self._t0: float = 0.0
        self._bwd_start: Optional[float] = None
        self._bwd_end: float = 0.0
        for module in modules:
            module.register_forward_pre_hook(self._forward_start)
            module.register_forward_hook(self._forward_end)
            for param in module.parameters():
                param.register_post_accumulate_grad_hook(self._core_grad)

    def _forward_start(self, module: nn.Module, args: Any) -> None:
        self._t0 = time.perf_counter()

    def _forward_end(self, module: nn.Module, args: Any, out: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self.forward_s += time.perf_counter() - self._t0
        tensor = out if isinstance(out, torch.Tensor) else out.values()
        if tensor.requires_grad:
            tensor.register_hook(self._output_grad)

    def _output_grad(self, grad: torch.Tensor) -> None:
        if self._bwd_start is None:
            self._bwd_start = time.perf_counter()

    def _core_grad(self, param: torch.Tensor) -> None:
        self._bwd_end = time.perf_counter()

    def step_done(self) -> None:
        """Call after each backward."""
        if self._bwd_start is not None:
            self.backward_s += self._bwd_end - self._bwd_start
            self._bwd_start = None
        self.steps += 1

    def per_rank_ms(self, env: "Dist") -> List[Dict[str, float]]:
        """``[{"forward": ms/step, "backward": ms/step}]`` of every rank (a collective)."""
        mine = torch.tensor([self.forward_s, self.backward_s], dtype=torch.float64) * 1e3 / max(self.steps, 1)
        every = env.all_gather(mine.to(env.device)).cpu().view(-1, 2)
        return [{"forward": float(f), "backward": float(b)} for f, b in every]


# ----------------------------------------------------------------------------- hot-row cache
def cache_modules(model: nn.Module) -> List[nn.Module]:
    """The (sharded or unsharded) TT collections of ``model`` that hold a cached table."""
    from torchrec_tt.modules import CachePopulationMixin

    return [m for m in model.modules() if isinstance(m, CachePopulationMixin)
            and any(t.cache_rows > 0 for t in m.embedding_bag_configs())]


def _hit_totals(names: Sequence[str], totals: torch.Tensor, env: "Dist") -> Dict[str, Dict[str, int]]:
    if env.world_size > 1:
        totals = totals.to(env.device)
        dist.all_reduce(totals)
    return {n: {"hits": int(h), "lookups": int(l)} for n, (h, l) in zip(names, totals.cpu().tolist())}


def cache_hit_counts(modules: Sequence[nn.Module], tables: Sequence[EmbeddingBagConfig], env: "Dist") -> Dict[str, Dict[str, int]]:
    """Stop counting; per cached table, lookups served by the cache and all lookups (summed over ranks)."""
    names = [t.name for t in tables if getattr(t, "cache_rows", 0) > 0]
    totals = torch.zeros(len(names), 2, dtype=torch.int64)
    for module in modules:
        for name, counts in module.stop_cache_warmup().items():
            rows = module.embedding_bags[name].cached_rows()
            totals[names.index(name)] = torch.stack([counts[rows].sum(), counts.sum()]).cpu()
    return _hit_totals(names, totals, env)


class TrainingHitCounter:
    """Cache hits of the training batches, counted as the batches are drawn: outside the timed
    TT forward, where the tables' own counting (an ``index_add_`` per table and call, ~50 us on the
    history table) would be timed with the cache it measures. Counts from the populated cache on."""

    def __init__(self, modules: Sequence[nn.Module], tables: Sequence[EmbeddingBagConfig],
                 renumber: Optional[nn.Module], env: "Dist") -> None:
        cached: Dict[str, torch.Tensor] = {}
        for module in modules:
            for name, bag in module.embedding_bags.items():
                if bag.config.cache_rows > 0:
                    cached[name] = bag.cached_rows().cpu()
        if env.world_size > 1:  # a table-wise sharded table's cache lives on its owner only
            every: List[Dict[str, torch.Tensor]] = [{} for _ in range(env.world_size)]
            dist.all_gather_object(every, cached)
            for part in every:
                cached.update(part)
        self._names = [t.name for t in tables if getattr(t, "cache_rows", 0) > 0]
        # feature -> (table's position, (num_embeddings,) bool: is the row of this raw id cached),
        # a row mask over the ids as drawn (torch.isin on the renumbered ids cost 1.7 ms per batch).
        mapping = renumber.mapping.cpu() if renumber is not None else None
        self._features: Dict[str, Tuple[int, torch.Tensor]] = {}
        for t in tables:
            if t.name in cached:
                is_cached = torch.zeros(t.num_embeddings, dtype=torch.bool)
                is_cached[cached[t.name]] = True
                for f in t.feature_names:
                    renumbered = mapping is not None and f in renumber.feature_names
                    self._features[f] = (self._names.index(t.name), is_cached[mapping] if renumbered else is_cached)
        self._env = env
        self._totals = torch.zeros(len(self._names), 2, dtype=torch.int64)

    def count(self, sparse: KeyedJaggedTensor) -> None:
        """Count one batch (the model's input, before renumbering)."""
        for feature, values in zip(sparse.keys(), torch.split(sparse.values(), sparse.length_per_key())):
            if feature in self._features:
                i, is_cached = self._features[feature]
                self._totals[i, 0] += int(is_cached[values].sum())
                self._totals[i, 1] += values.numel()

    def totals(self) -> Dict[str, Dict[str, int]]:
        """Per cached table, hits and lookups so far (summed over ranks; a collective)."""
        return _hit_totals(self._names, self._totals, self._env)


def time_cache_split(bag: nn.Module, batches: Sequence[Any], repeats: int = 61) -> Dict[str, float]:
    """Forward+backward seconds per batch of one table with its cache and without it (all
    lookups through the TT op, same cores), on the same batches: the medians of ``repeats``, the
    median of the repeats' ratios (``ratio``) and its quartiles (``ratio_q1``, ``ratio_q3``).
    Within a repeat the two run back to back on each batch, in turn first, so that drift in the
    machine's speed (large on shared 2-core VMs) cancels over milliseconds, not over a pass over
    the batches; Python's garbage collector is paused. Each step starts with the gradients
    cleared (untimed), as a training step does, so the backward hands its gradients over instead
    of adding them to the last step's."""
    from torchrec_tt.ops import tt_embedding_bag

    def step(cached: bool, ids: torch.Tensor, offsets: torch.Tensor) -> float:
        bag.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = bag._pool(ids, offsets, None) if cached else tt_embedding_bag(
            bag.compute_cores(), ids, offsets, None, pooling=bag._pooling, variant=bag.config.variant)
        out.sum().backward()
        return time.perf_counter() - t0

    def repeat(r: int) -> Tuple[float, float]:
        spent = {True: 0.0, False: 0.0}
        for i, (ids, offsets) in enumerate(batches):
            for cached in ((True, False) if (r + i) % 2 == 0 else (False, True)):
                spent[cached] += step(cached, ids, offsets)
        return spent[True] / len(batches), spent[False] / len(batches)

    repeat(0)  # warm-up
    gc.collect()
    gc.disable()  # a collection inside one arm's timing would land on that arm only
    try:
        times = [repeat(r) for r in range(repeats)]
    finally:
        gc.enable()
        bag.zero_grad(set_to_none=True)
    ratios = statistics.quantiles([t[0] / t[1] for t in times], n=4, method="inclusive")
    return {"with_cache_s": statistics.median(t[0] for t in times),
            "without_cache_s": statistics.median(t[1] for t in times),
            "ratio": ratios[1], "ratio_q1": ratios[0], "ratio_q3": ratios[2], "repeats": repeats}


def cache_report(args: argparse.Namespace, model: nn.Module, tables: Sequence[EmbeddingBagConfig], data: "Prepared",
                 embedding: str, env: "Dist") -> Dict[str, Any]:
    """History table: TT lookups and work removed by its cache (count_ops on 40 batches), and
    (one rank) its forward+backward time with and without the cache on 10 of them."""
    import itertools

    from torchrec_tt.data.renumber import group_stats

    table = tables[0]
    key = f"embedding_bags.{table.name}.cache_ids"
    cache_ids = next(v for k, v in model.state_dict().items() if k.endswith(key)).cpu()  # collective when sharded
    mapping = data.mappings[args.renumber]
    batches = list(itertools.islice(data.task.history_batches(args.batch_size), 40))
    without = group_stats(table, batches, mapping)
    with_cache = group_stats(table, batches, mapping, cache_ids=cache_ids)
    work = {"grt": ("grt_flops", "grt_backward_flops"), "tt": ("tt_flops", "tt_backward_flops")}[embedding]
    flops = [sum(getattr(s, f) for f in work) for s in (without, with_cache)]
    # The op's work with the cache is its TT part plus the hits' own reads and gradient adds.
    cache_flops = with_cache.cache_flops + with_cache.cache_backward_flops
    out = {"table": table.name, "cache_rows": table.cache_rows,
           "history_hit_rate": with_cache.cache_hit_rate, "history_P_G_tt_part": with_cache.groups_per_bag,
           "history_P_G_no_cache": without.groups_per_bag, "tt_work_removed": 1.0 - flops[1] / flops[0],
           "work_removed": 1.0 - (flops[1] + cache_flops) / flops[0]}
    if env.world_size == 1:
        bag = model.sparse_arch.embedding_bags[table.name]
        sample = [(mapping[i] if mapping is not None else i, o) for i, o in batches[:10]]
        out.update(time_cache_split(bag, sample))
    return out


# ----------------------------------------------------------------------------- run
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--embedding", type=_embeddings, default=["grt"],
                   help="grt | tt (TT kernel variants) | dense (TorchRec tables); a comma list such as "
                        "grt,dense trains each on the same data and seed and prints a comparison")
    p.add_argument("--movielens", default=None,
                   help="path of ML-20M ratings.csv (or its folder); default: synthetic data")
    p.add_argument("--synthetic-users", type=int, default=SyntheticConfig.num_users)
    p.add_argument("--synthetic-items", type=int, default=SyntheticConfig.num_items)
    p.add_argument("--synthetic-p", type=float, default=SyntheticConfig.mean_liked, help="mean liked items per user")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--tt-rank", type=int, default=32, help="every inner TT rank")
    p.add_argument("--tt-cores", type=int, default=3)
    p.add_argument("--tt-data-type", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype the TT cores are stored in (bf16/fp16: half the bytes, fp32 arithmetic)")
    p.add_argument("--tt-p-shapes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="row factors, e.g. 21,22,50 (default: torchrec_tt.suggest_tt_shapes)")
    p.add_argument("--tables", choices=("separate", "shared"), default="separate",
                   help="one item table per feature (history, candidate) or one shared table")
    p.add_argument("--init-scale", type=float, default=0.1, help="uniform init range of the tables (TT: same variance)")
    p.add_argument("--renumber", choices=RENUMBERINGS, default="cluster",
                   help="item renumbering: co-occurrence clusters with hot items first in each (cluster), "
                        "by frequency (freq), or none")
    p.add_argument("--sharding", choices=tuple(SHARDINGS), default="auto",
                   help="TT tables on several ranks: tw (table-wise), dp (data-parallel) or auto (the planner's "
                        "choice from cost)")
    p.add_argument("--batch-size", type=int, default=512, help="per rank")
    p.add_argument("--epochs", type=int, default=2, help="passes over the users")
    p.add_argument("--train-positives", type=int, default=4, help="training positives per user and epoch")
    p.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the MLPs")
    p.add_argument("--emb-lr", type=float, default=None,
                   help="Adagrad learning rate of the tables (default: 1.0 dense, 0.03 TT; measured best)")
    p.add_argument("--negatives", choices=("popularity", "uniform"), default="popularity")
    p.add_argument("--train-negatives", type=int, default=1, help="negatives per training positive")
    p.add_argument("--test-negatives", type=int, default=1, help="negatives per held-out like")
    p.add_argument("--eval-users", type=int, default=20_000, help="users in the AUC evaluation (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: OMP_NUM_THREADS if set, else cores / local ranks)")
    p.add_argument("--json", default=None, help="write the results to this JSON file (rank 0)")
    p.add_argument("--save", default=None,
                   help="save the trained model's state_dict here, '{embedding}' is replaced (world size 1)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--cache-fraction", type=_fractions, default=[0.0],
                   help="share of each TT table's rows in its hot-row cache; a comma list (e.g. "
                        "0,0.001,0.01,0.05) trains each on the same data and seed")
    p.add_argument("--cache-lr", type=float, default=None,
                   help="Adagrad learning rate of the cached rows (default: the dense tables' 1.0; they are "
                        "uncompressed rows)")
    p.add_argument("--cache-warmup-steps", type=int, default=20,
                   help="steps whose accesses are counted before the cache is populated")
    p.add_argument("--init-from-dense", default=None,
                   help="state_dict of a trained --embedding dense model (--save): its tables are converted "
                        "to TT (torchrec_tt.convert_ebc_to_tt) and fine-tuned (--max-steps; 0: evaluate only)")
    p.add_argument("--convert-max-error", type=float, default=None,
                   help="relative reconstruction error target of --init-from-dense (default: rank --tt-rank)")
    return p.parse_args(argv)


def _embeddings(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in EMBEDDINGS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {EMBEDDINGS}")
    return names


def _fractions(text: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of fractions in [0, 1]")
    return values


def load_data(args: argparse.Namespace):
    if args.movielens:
        return load_movielens(args.movielens)
    return generate_liked_items(SyntheticConfig(num_users=args.synthetic_users, num_items=args.synthetic_items,
                                                mean_liked=args.synthetic_p, seed=args.seed))


class Prepared:
    """What every embedding kind shares: data, split, renumberings and their group statistics."""

    def __init__(self, args: argparse.Namespace, say) -> None:
        t0 = time.perf_counter()
        self.liked = load_data(args)
        self.task = LikedTask(self.liked, negatives=args.negatives, train_positives=args.train_positives,
                              train_negatives=args.train_negatives, test_negatives=args.test_negatives,
                              seed=args.seed)
        self.stats = {"source": args.movielens or "synthetic", **self.liked.stats(),
                      "seconds": time.perf_counter() - t0}
        say(f"data: {self.stats['source']}: {self.liked.num_users} users, {self.stats['items']} items, "
            f"{self.stats['P']:.1f} liked per user ({self.stats['seconds']:.1f} s)")
        t0 = time.perf_counter()
        task = self.task
        self.mappings = {
            "none": None,
            "freq": frequency_renumbering(task.item_counts),
            "cluster": cluster_renumbering(task.history_offsets, task.history_items, task.num_items, seed=args.seed),
        }
        # P and P_G of the history bags in the run's TT layout, before and after renumbering.
        layout = make_tables(args, "grt", task.num_items)[0]
        self.groups = {"tt_p_shapes": layout.tt_p_shapes, "renumber": args.renumber, "seconds": 0.0, **{
            name: asdict(group_stats(layout, task.history_batches(args.batch_size), m))
            for name, m in self.mappings.items()}}
        self.groups["seconds"] = time.perf_counter() - t0


def train_and_evaluate(args: argparse.Namespace, embedding: str, env: Dist, data: Prepared, say,
                       cache_fraction: float = 0.0) -> Dict[str, Any]:
    """Build, (shard,) train and evaluate one model; returns its results."""
    task = data.task
    emb_lr = args.emb_lr if args.emb_lr is not None else DEFAULT_EMB_LR[embedding]
    results: Dict[str, Any] = {"embedding": embedding, "emb_lr": emb_lr, "world_size": env.world_size,
                               "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)),
                               "backend": env.backend, "device": str(env.device), "args": vars(args),
                               "data": data.stats, "groups": data.groups}
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # same initial MLPs whatever ran before
    cache_fraction = cache_fraction if embedding != "dense" else 0.0
    tables = make_tables(args, embedding, task.num_items, cache_fraction)
    results["tables"] = table_memory(tables)
    results["cache_fraction"] = cache_fraction
    renumber = FeatureRenumbering(task.num_items, [HISTORY, CANDIDATE], data.mappings[args.renumber])
    if embedding == "dense":
        ebc: nn.Module = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    else:
        ebc = TTEmbeddingBagCollection(tables, device=torch.device("cpu"), validate_inputs=False)
    model: nn.Module = DLRMLike(ebc, renumber)
    if args.init_from_dense and embedding != "dense":
        # Conversion recipe: a trained dense model (--embedding dense --save PATH), its tables
        # replaced by TT tables fitted to their rows, then fine-tuned like a TT model.
        from torchrec_tt import convert_ebc_to_tt

        model = DLRMLike(EmbeddingBagCollection(tables=make_tables(args, "dense", task.num_items),
                                                device=torch.device("cpu")), renumber)
        model.load_state_dict(torch.load(args.init_from_dense))
        if args.convert_max_error is not None:
            report = convert_ebc_to_tt(model, max_rel_error=args.convert_max_error)
        else:  # the TT layout of a from-scratch run: every inner rank --tt-rank
            report = convert_ebc_to_tt(model, memory_budget=1 << 62, ranks=[args.tt_rank])
        results["conversion"] = report
        results["tables"] = table_memory(model.sparse_arch.embedding_bag_configs())
        for name, r in report.items():
            say(f"converted {name}: ranks {r['tt_ranks']}, {r['compression']:.1f}x, relative error {r['rel_error']:.3f}")
    first_epoch = task.train_examples(0)
    cache_lr = args.cache_lr if args.cache_lr is not None else DEFAULT_EMB_LR["dense"]
    if env.world_size > 1:
        sample = task.make_batch(first_epoch.subset(torch.arange(args.batch_size))).sparse
        pooling = {HISTORY: data.groups["none"]["pooling_factor"], CANDIDATE: 1.0}
        model, results["sharding"] = shard_model(model, embedding, emb_lr, args.batch_size, env, tables, sample,
                                                 pooling, args.sharding, cache_lr)
    else:
        model = model.to(env.device)
    optimizer = Optimizers(model, args.lr, emb_lr, cache_lr)
    timer = TTComputeTimer(model) if embedding != "dense" else None
    caches = cache_modules(model)
    if caches and args.init_from_dense:
        raise ValueError("--cache-fraction > 0 does not combine with --init-from-dense (converted tables have no cache)")

    # ---- train
    total_steps = task.num_batches(first_epoch, args.batch_size, env.world_size) * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    say(f"train {embedding}: {total_steps} steps of {env.world_size} x {args.batch_size} examples "
        f"({env.world_size} rank(s), {env.backend}, {torch.get_num_threads()} thread(s) per rank)")
    warmup = min(args.cache_warmup_steps, max(1, total_steps // 4)) if caches else 0
    for module in caches:
        module.start_cache_warmup()

    hit_counter: List[TrainingHitCounter] = []

    def batches() -> Iterator[Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]]:
        for epoch in range(args.epochs):
            examples = first_epoch if epoch == 0 else task.train_examples(epoch)
            for batch in task.batches(examples, args.batch_size, env.rank, env.world_size):
                for counter in hit_counter:
                    counter.count(batch.sparse)
                yield batch.dense, batch.sparse, batch.labels

    def on_step(step: int) -> None:
        if timer is not None:
            timer.step_done()
        if caches and step == warmup:  # cache the most accessed rows, then count hits
            for module in caches:
                for name, bag in module.embedding_bags.items():
                    if bag.config.cache_rows > 0:  # from the warm-up counts (summed over the ranks of a DP table)
                        module.populate_cache(name, optimizer=optimizer.holding(bag.cache_weight))
            hit_counter.append(TrainingHitCounter(caches, tables, renumber, env))

    results["train"] = train_steps(model, optimizer, batches(), total_steps, env.device,
                                   args.batch_size * env.world_size,
                                   show_progress=not args.no_progress and env.is_main, on_step=on_step)
    if timer is not None:
        results["train"]["tt_compute_ms_per_rank"] = timer.per_rank_ms(env)

    if caches:
        train_hits = hit_counter[0].totals() if hit_counter else cache_hit_counts(caches, tables, env)
        results["cache"] = {"warmup_steps": warmup, "train": train_hits}
        for module in caches:
            module.stop_cache_warmup()
            module.start_cache_warmup()

    # ---- evaluate
    model.eval()
    test = task.test_examples(args.eval_users or None)
    scores, labels, valid = [], [], []
    t_eval = time.perf_counter()
    with torch.no_grad():
        for batch in task.batches(test, args.batch_size, env.rank, env.world_size, pad=True):
            batch = batch.to(env.device)
            scores.append(model(batch.dense, batch.sparse).float())
            labels.append(batch.labels)
            valid.append(batch.valid.to(torch.uint8))  # NCCL gathers bytes, not bools
    scores_all = env.all_gather(torch.cat(scores)).cpu()
    labels_all = env.all_gather(torch.cat(labels)).cpu()
    valid_all = env.all_gather(torch.cat(valid)).cpu().bool()
    results["eval"] = {"examples": int(valid_all.sum()), "seconds": time.perf_counter() - t_eval,
                       "auc": auc_score(scores_all[valid_all], labels_all[valid_all]),
                       "popularity_auc": auc_score(task.item_counts[test.candidates].double(), test.labels)}
    if caches:
        results["cache"]["eval"] = cache_hit_counts(caches, tables, env)
        results["cache"].update(cache_report(args, model, tables, data, embedding, env))
    results["seconds"] = time.perf_counter() - t0
    if args.save:
        if env.world_size == 1:
            torch.save(model.state_dict(), args.save.format(embedding=embedding))
        else:
            say("--save: skipped; this example saves unsharded models only (world size 1)")
    return results


def variants(args: argparse.Namespace) -> List[Tuple[str, str, Dict[str, Any]]]:
    """``(name, embedding, kwargs)``: every ``--embedding`` kind, TT kinds at every ``--cache-fraction``."""
    out = []
    for embedding in args.embedding:
        for fraction in args.cache_fraction if embedding != "dense" else [0.0]:
            name = embedding if len(args.cache_fraction) == 1 or embedding == "dense" else f"{embedding}+cache{fraction:g}"
            out.append((name, embedding, {"cache_fraction": fraction}))
    return out


def run(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Train and evaluate every ``--embedding`` kind on the same data; results by kind."""
    return run_kinds(args, Prepared, train_and_evaluate, format_report, format_comparison, variants)


def format_report(r: Dict[str, Any]) -> str:
    lines = ["", f"== {r['embedding']} | {r['world_size']} rank(s) ({r['backend']}) | table lr {r['emb_lr']} | "
             f"data: {r['data']['source']} "
             f"({r['data']['users']} users, {r['data']['items']} items, {r['data']['P']:.1f} liked per user)"]
    lines.append(f"{'table':<10} {'rows':>7} {'dim':>4} {'TT rows (p)':<14} {'ranks':<9} {'MiB':>8} "
                 f"{'dense MiB':>10} {'compression':>11}")
    for t in r["tables"]:
        lines.append(f"{t['table']:<10} {t['rows']:>7} {t['dim']:>4} {str(t['shape'] or '-'):<14} "
                     f"{str(t['ranks'] or '-'):<9} "
                     f"{t['bytes'] / 2**20:>8.3f} {t['dense_bytes'] / 2**20:>10.3f} {t['compression']:>10.1f}x")
    g = r["groups"]
    b, a = g["none"], g[g["renumber"]]
    lines.append(f"history bags, TT rows {g['tt_p_shapes']} (group = id // {g['tt_p_shapes'][-1]}), "
                 f"batch {r['args']['batch_size']}, renumbering used: {g['renumber']}")
    lines.append(f"  P = {b['pooling_factor']:.2f}   P_G: before renumbering {b['groups_per_bag']:.2f}, "
                 f"after freq {g['freq']['groups_per_bag']:.2f}, after cluster {g['cluster']['groups_per_bag']:.2f}")
    lines.append(f"  forward MFLOP per batch: tt {b['tt_flops'] / 1e6:.4g}; grt {b['grt_flops'] / 1e6:.4g} before, "
                 f"{a['grt_flops'] / 1e6:.4g} after renumbering ({b['tt_flops'] / a['grt_flops']:.1f}x fewer than tt)")
    t, e = r["train"], r["eval"]
    if r.get("sharding"):
        lines.append("sharding: " + ", ".join(f"{name} {kind}" for name, kind in r["sharding"].items()))
    lines.append(f"train: {t['steps']} steps in {t['seconds']:.1f} s = {t['examples_per_second']:.0f} examples/s, "
                 f"final loss {t['final_loss']:.4f}")
    if t.get("tt_compute_ms_per_rank"):
        per_rank = [c["forward"] + c["backward"] for c in t["tt_compute_ms_per_rank"]]
        lines.append("TT forward+backward per rank (ms/step): "
                     + ", ".join(f"rank {i} {c['forward']:.2f}+{c['backward']:.2f}"
                                 for i, c in enumerate(t["tt_compute_ms_per_rank"]))
                     + f" (max/min {max(per_rank) / max(min(per_rank), 1e-9):.2f})")
    lines.append(f"eval: AUC = {e['auc']:.4f} on {e['examples']} examples (popularity-only baseline "
                 f"{e['popularity_auc']:.4f})   model built, trained and evaluated in {r['seconds']:.1f} s")
    c = r.get("cache")
    if c:
        rate = {phase: {n: v["hits"] / max(v["lookups"], 1) for n, v in c[phase].items()} for phase in ("train", "eval")}
        lines.append(f"cache: {r['cache_fraction']:.3%} of the rows, populated after {c['warmup_steps']} warm-up steps; "
                     f"hit rate train {fmt_rates(rate['train'])}, eval {fmt_rates(rate['eval'])}")
        lines.append(f"  {c['table']} table, 40 batches: {c['history_hit_rate']:.1%} of the history lookups served by the "
                     f"cache (TT lookups removed), P_G of the TT part {c['history_P_G_tt_part']:.2f} (no cache "
                     f"{c['history_P_G_no_cache']:.2f}), TT work removed {c['tt_work_removed']:.1%}, the op's "
                     f"work (TT part and the hits' own adds) down {c['work_removed']:.1%}")
        if "with_cache_s" in c:
            lines.append(f"  {c['table']} forward+backward per batch: {1e3 * c['with_cache_s']:.2f} ms with the cache, "
                         f"{1e3 * c['without_cache_s']:.2f} ms without "
                         f"(medians of {c['repeats']} repeats, the two in turn on each batch; median ratio "
                         f"{c['ratio'] - 1:+.1%} with the cache, quartiles {c['ratio_q1'] - 1:+.1%} and "
                         f"{c['ratio_q3'] - 1:+.1%})")
    return "\n".join(lines)


def fmt_rates(rates: Dict[str, float]) -> str:
    return ", ".join(f"{n} {v:.1%}" for n, v in rates.items())


def format_comparison(results: Dict[str, Dict[str, Any]]) -> str:
    """One line per embedding kind (and cache size): same data, seed and steps."""
    lines = ["", f"{'embedding':<18} {'tables MiB':>10} {'compression':>11} {'steps':>6} {'s/step':>7} "
                 f"{'examples/s':>11} {'AUC':>7} {'hist. hits':>10} {'TT work -':>9} {'op work -':>9}"]
    for name, r in results.items():
        stored = sum(t["bytes"] for t in r["tables"])
        dense = sum(t["dense_bytes"] for t in r["tables"])
        c = r.get("cache") or {}
        hits = f"{c['history_hit_rate']:.1%}" if c else "-"
        removed = f"{c['tt_work_removed']:.1%}" if c else "-"
        net = f"{c['work_removed']:.1%}" if c else "-"
        lines.append(f"{name:<18} {stored / 2**20:>10.3f} {dense / stored:>10.1f}x {r['train']['steps']:>6} "
                     f"{r['train']['seconds'] / max(r['train']['steps'], 1):>7.3f} "
                     f"{r['train']['examples_per_second']:>11.0f} {r['eval']['auc']:>7.4f} {hits:>10} {removed:>9} "
                     f"{net:>9}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
