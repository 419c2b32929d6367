"""Pieces the end-to-end examples share: metrics, process-group set-up, optimizers, table bytes.

Used by ``examples/dlrm_movielens.py`` and ``examples/dlrm_criteo.py`` (the examples are not
part of the package; this module is, so both import one implementation).
"""

import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.configs import TTEmbeddingBagConfig

ADAGRAD_EPS = 1e-8  # FBGEMM's default; the same for TorchRec, TT and unsharded tables


# ----------------------------------------------------------------------------- metrics
def auc_score(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC (Mann-Whitney U with tied scores sharing their mean rank).

    Args:
        scores (torch.Tensor): ``(N,)`` scores (any monotone transform of the logits).
        labels (torch.Tensor): ``(N,)`` labels, positive where ``> 0.5``.
    """
    scores, labels = scores.double().flatten(), labels.flatten() > 0.5
    num_pos = int(labels.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"auc_score: needs positives and negatives, got {num_pos} and {num_neg}")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = torch.repeat_interleave(ends - (counts.double() - 1) / 2, counts)  # 1-based
    pos_rank_sum = float(mean_rank[labels[order]].sum())
    return (pos_rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy (nats) of ``(N,)`` logits against ``(N,)`` 0/1 labels."""
    if logits.numel() == 0:
        raise ValueError("log_loss: needs at least one example, got 0")
    return float(nn.functional.binary_cross_entropy_with_logits(logits.double().flatten(), labels.double().flatten()))


# ----------------------------------------------------------------------------- tables
def table_memory(tables: Sequence[EmbeddingBagConfig]) -> List[Dict[str, Any]]:
    """Per table: rows, dim, TT shape and ranks (``None`` for dense tables), hot-row cache rows,
    stored bytes (cores plus cache, where the config has one), dense fp32 bytes, compression."""
    rows = []
    for t in tables:
        dense = t.num_embeddings * t.embedding_dim * 4
        cache_rows = getattr(t, "cache_rows", 0)
        stored = dense
        if isinstance(t, TTEmbeddingBagConfig):
            stored = t.storage_bytes() + (t.cache_bytes() if cache_rows else 0)
        rows.append({"table": t.name, "rows": t.num_embeddings, "dim": t.embedding_dim,
                     "shape": getattr(t, "tt_p_shapes", None), "ranks": getattr(t, "tt_ranks", None),
                     "cache_rows": cache_rows, "bytes": stored, "dense_bytes": dense, "compression": dense / stored})
    return rows


# ----------------------------------------------------------------------------- distributed
class Dist:
    """Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

    def __init__(self, device_arg: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
        if use_cuda:
            self.device = torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.backend = "nccl" if use_cuda else "gloo"
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(self.backend, device_id=self.device if use_cuda else None)
        self.pg = dist.group.WORLD if self.world_size > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- optimizers
def embedding_fused_params(emb_lr: float, cache_lr: Optional[float] = None) -> Dict[str, Any]:
    """The tables' optimizer, in TorchRec's ``fused_params`` form (CPU TBE kernels offer
    only SGD and Adagrad variants; exact Adagrad is used for every kind of table);
    ``cache_lr``: the learning rate of TT tables' cached rows (default: the cores')."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    params = {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": emb_lr, "eps": ADAGRAD_EPS}
    return params if cache_lr is None else {**params, "cache_learning_rate": cache_lr}


class Optimizers:
    """Adagrad for the tables (unless a sharder fused it into backward), Adam for the rest.

    Table parameters are those whose name contains ``"sparse_arch."``; sparse gradients
    (``nn.EmbeddingBag(sparse=True)``) are fine, torch's Adagrad updates only their rows.
    Learning rates: ``emb_lr`` for the dense tables; ``tt_lr`` for the TT cores (default
    ``emb_lr``); ``cache_lr`` for TT tables' cached rows (``cache_weight``; uncompressed rows
    may want a dense table's rate), default the cores'.

    ``tt_warmup_steps``: the TT cores' rate rises linearly over that many steps (step ``t``,
    0-based, uses ``tt_lr * min(1, (t + 1) / tt_warmup_steps)``; 0: constant). Adagrad's first
    updates move every entry by about its rate whatever the gradient's scale, and TT core
    entries are only ~0.1 (ranks 32), so at ``tt_lr`` 0.1 the first steps would all but
    re-draw the cores; the warm-up keeps those steps small. Only for cores stepped here (fp32,
    unsharded): fp16/bf16 cores are stepped in backward, so asking for a warm-up then raises
    ``ValueError``.
    """

    def __init__(self, model: nn.Module, lr: float, emb_lr: float, cache_lr: Optional[float] = None,
                 tt_lr: Optional[float] = None, tt_warmup_steps: int = 0) -> None:
        from torchrec_tt.modules import TTEmbeddingBag

        tt_lr = emb_lr if tt_lr is None else tt_lr
        cache_lr = tt_lr if cache_lr is None else cache_lr
        tt_params = {id(p) for m in model.modules() if isinstance(m, TTEmbeddingBag) for p in m.parameters()}
        rate_of: Dict[str, float] = {}  # table parameters by name -> their Adagrad rate
        dense = []
        for name, param in model.named_parameters():
            if not param.requires_grad or getattr(param, "_in_backward_optimizers", None):
                continue  # stepped in backward by the sharded module's fused optimizer
            if name.endswith(".cache_weight"):
                rate_of[name] = cache_lr
            elif id(param) in tt_params:
                rate_of[name] = tt_lr
            elif "sparse_arch." in name:
                rate_of[name] = emb_lr
            else:
                dense.append(param)
        self.optimizers = [torch.optim.Adam(dense, lr=lr)]
        params = dict(model.named_parameters())
        low = {n: params[n] for n in rate_of if params[n].dtype in (torch.float16, torch.bfloat16)}
        if low:
            # fp16/bf16 TT cores: fp32 Adagrad state and update, stochastic rounding (stepped in
            # backward, as when sharded); a plain torch Adagrad would keep bf16 state and lose
            # most small updates to rounding.
            from torchrec_tt import TTFusedOptimizer

            self.low_precision = TTFusedOptimizer(low, torch.optim.Adagrad, {"lr": emb_lr, "eps": ADAGRAD_EPS},
                                                  {n: {"lr": rate_of[n]} for n in low})
        if tt_warmup_steps < 0 or (tt_warmup_steps > 0 and any(id(p) in tt_params for p in low.values())):
            raise ValueError(f"Optimizers: tt_warmup_steps must be >= 0 and needs fp32 TT cores, got {tt_warmup_steps}")
        groups: Dict[Tuple[float, bool], List[torch.Tensor]] = {}  # (rate, TT cores?) -> parameters
        for name, rate in rate_of.items():
            if name not in low:
                is_core = id(params[name]) in tt_params and not name.endswith(".cache_weight")
                groups.setdefault((rate, is_core), []).append(params[name])
        self._tt_groups: List[Dict[str, Any]] = []  # the Adagrad groups of the TT cores (warmed up)
        self._tt_warmup_steps, self._steps = tt_warmup_steps, 0
        if groups:
            adagrad = torch.optim.Adagrad([{"params": g, "lr": r, "tt_cores": c} for (r, c), g in groups.items()],
                                          eps=ADAGRAD_EPS)
            self._tt_groups = [g for g in adagrad.param_groups if g["tt_cores"]]
            for g in self._tt_groups:
                g["peak_lr"] = g["lr"]
            self.optimizers.append(adagrad)
        self._warm_up_tt_rate()

    def _warm_up_tt_rate(self) -> None:
        """The TT cores' rate for the next step (during ``tt_warmup_steps``)."""
        if self._tt_warmup_steps > 0:
            scale = min(1.0, (self._steps + 1) / self._tt_warmup_steps)
            for g in self._tt_groups:
                g["lr"] = g["peak_lr"] * scale

    def holding(self, param: torch.Tensor) -> Optional[torch.optim.Optimizer]:
        """The optimizer that steps ``param`` (e.g. for per-row state that moves with it)."""
        return next((o for o in self.optimizers for g in o.param_groups if any(p is param for p in g["params"])), None)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()
        self._steps += 1
        self._warm_up_tt_rate()


# ----------------------------------------------------------------------------- runs
def parse_embeddings(text: str, choices: Sequence[str] = ("grt", "tt", "dense")) -> List[str]:
    """``"grt,dense"`` -> ``["grt", "dense"]`` (argparse ``type=``); raises on unknown names."""
    import argparse

    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in choices]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {tuple(choices)}")
    return names


def train_steps(
    model: nn.Module,
    optimizer: "Optimizers",
    batches: Iterable[Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]],
    total_steps: int,
    device: torch.device,
    examples_per_step: int,
    show_progress: bool,
    on_step: Optional[Callable[[int], None]] = None,
) -> Dict[str, float]:
    """Binary cross-entropy training over ``(dense, sparse, labels)`` batches, at most
    ``total_steps`` steps, with a tqdm bar; the loss is read every 10 steps (few host syncs).
    ``on_step(step)`` runs after each optimizer step (e.g. to populate a hot-row cache after
    a warm-up).

    Returns:
        ``steps``, ``seconds``, ``ms_per_step``, ``examples_per_second``, ``first_loss``
        and ``final_loss`` (means over the first and the last 10-20 steps).
    """
    from tqdm import tqdm

    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    step, losses = 0, []
    running = torch.zeros((), device=device)
    bar = tqdm(total=total_steps, disable=not show_progress, unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)  # few lines in logs
    start = time.perf_counter()
    for dense, sparse, labels in batches:
        if step >= total_steps:
            break
        logits = model(dense.to(device), sparse.to(device)).reshape(-1)
        loss = loss_fn(logits, labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        running += loss.detach()
        if on_step is not None:
            on_step(step)
        bar.update(1)
        if step % 10 == 0 or step == total_steps:
            losses.append(float(running) / (step - 10 * len(losses)))
            running.zero_()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    return {"steps": step, "seconds": seconds, "ms_per_step": 1e3 * seconds / max(step, 1),
            "examples_per_second": step * examples_per_step / max(seconds, 1e-9),
            "first_loss": losses[0] if losses else float("nan"),
            "final_loss": sum(losses[-2:]) / max(1, len(losses[-2:]))}


def threads_per_rank(requested: int, world_size: int) -> int:
    """Intra-op threads of this rank: ``requested`` if > 0, else ``OMP_NUM_THREADS`` when set
    (``launch/main_job.sh`` sets 1; torchrun sets 1 for several ranks), else the cores shared
    evenly by this host's ranks."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def run_kinds(
    args: Any,
    prepare: Callable[[Any, Callable[..., None]], Any],
    train_one: Callable[..., Dict[str, Any]],
    format_report: Callable[[Dict[str, Any]], str],
    format_comparison: Callable[[Dict[str, Dict[str, Any]]], str],
    variants: Optional[Callable[[Any], List[Tuple[str, str, Dict[str, Any]]]]] = None,
) -> Dict[str, Dict[str, Any]]:
    """An example's main loop: set up the process (group, threads), ``prepare`` the data
    once, ``train_one(args, embedding, env, data, say, **kwargs)`` every variant on it, print
    reports (rank 0), write ``args.json``. ``variants(args)`` lists ``(name, embedding,
    kwargs)`` (default: one per ``args.embedding`` kind, no kwargs). Returns the results by
    name."""
    env = Dist(args.device)
    torch.set_num_threads(threads_per_rank(args.threads, env.world_size))
    torch.set_flush_denormal(True)  # optimizer state of rarely seen rows decays into (slow) denormals
    say = print if env.is_main else (lambda *a, **k: None)
    start = time.perf_counter()
    data = prepare(args, say)
    results = {}
    for name, embedding, kwargs in variants(args) if variants else [(e, e, {}) for e in args.embedding]:
        results[name] = train_one(args, embedding, env, data, say, **kwargs)
        say(format_report(results[name]))
    if len(results) > 1:
        say(format_comparison(results))
    say(f"total {time.perf_counter() - start:.1f} s")
    if env.is_main and args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    env.barrier()
    env.close()
    return results
