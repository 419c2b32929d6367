"""Benchmark ``grt`` vs ``tt`` vs uncompressed embedding bags, side by side.

    python -m torchrec_tt.bench                      # the paper's table and the 10M-row table
    python -m torchrec_tt.bench --device cuda

All variants run in one process on the same inputs, after warm-up, interleaved within
every repeat; the medians over repeats are reported, next to the same machine's large
``torch.mm`` rate (the practical roof). The forward is timed without autograd (inference: grt
builds no plan) and, for grt, also with autograd recording (a training step's forward, which
builds the plan for the backward). On a multi-threaded CPU, grt's inference forward is also timed
on one thread in every repeat: the ratio of the two (the threads' speedup) tells a repeat in which
the threads slowed each other (README, the slow state) from one in which the machine was slow.
Profiled passes then split grt's forward+backward and its inference forward into their phases
(plan, prefixes, rows, slots, ...; docs/design.md section 3) and, on CUDA, count kernel launches
per call. Writes ``<out>/bench_<device>.json`` and ``.png``.
"""

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from torchrec_tt.data.synthetic import zipf_bags
from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.modules import TTEmbeddingBag
from torchrec_tt.op_counts import RowPathStats, count_ops, op_counts_from_stats
from torchrec_tt.ops import uses_extension


@dataclass(frozen=True)
class BenchConfig:
    name: str
    p_shapes: List[int]
    q_shapes: List[int]
    ranks: List[int]
    num_rows: int
    batch_size: int
    pooling_factor: int


PAPER = BenchConfig("paper", [21, 22, 50], [4, 4, 4], [32, 32], 23100, 1024, 45)
TEN_M = BenchConfig("10M", [200, 250, 200], [4, 4, 4], [32, 32], 10_000_000, 8192, 45)

# fp32 non-tensor-core peaks (dense FLOP/s) of the GPUs this project is measured on.
_FP32_PEAK = {"H100 PCIe": 51.2e12, "H100": 66.9e12, "H200": 66.9e12, "A100": 19.5e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def fp32_peak(name: str) -> Optional[float]:
    return next((peak for key, peak in _FP32_PEAK.items() if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, iters: int) -> float:
    """Mean seconds per call over ``iters`` calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


MM_SIZE = 2048


def mm_call(device: torch.device, size: int = MM_SIZE) -> Callable[[], None]:
    """One large fp32 ``torch.mm`` (2 size^3 FLOPs) on ``device``: the practical roof."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return lambda: torch.mm(a, b)


def mm_roof(device: torch.device, size: int = MM_SIZE, repeats: int = 5) -> float:
    """Median FLOP/s of a large fp32 ``torch.mm`` on ``device``."""
    mm = mm_call(device, size)
    _time(mm, device, 2)
    return 2 * size**3 / statistics.median(_time(mm, device, 3) for _ in range(repeats))


def on_one_thread(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run with one intra-op thread (the caller's count restored after)."""

    def one_thread() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)

    return one_thread


def grt_phases(fwd_bwd: Callable[[], None], device: torch.device, iters: int) -> Dict:
    """Per-call time of every ``torchrec_tt::`` phase of grt forward+backward, and CUDA launches.

    The CPU kernels mark their phases with ``RECORD_FUNCTION`` scopes; CUDA kernels are
    grouped by the op that launched them.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fwd_bwd()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fwd_bwd()
        _sync(device)
    phases_ms: Dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("torchrec_tt::"):
            phases_ms[event.key] = event.cpu_time_total / iters / 1e3
    record: Dict = {"phases_ms": phases_ms}
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        record["cuda_launches_per_fwd_bwd"] = len(kernels) / iters
        record["cuda_kernel_ms"] = {}
        for e in kernels:
            record["cuda_kernel_ms"][e.name] = record["cuda_kernel_ms"].get(e.name, 0.0) + e.device_time / iters / 1e3
    return record


def run_config(
    cfg: BenchConfig, device: torch.device, repeats: int, iters: int, warmup: int, seed: int, alpha: float
) -> Dict:
    torch.manual_seed(seed)
    table = lambda variant: TTEmbeddingBagConfig(  # noqa: E731
        name=cfg.name,
        num_embeddings=cfg.num_rows,
        embedding_dim=cfg.q_shapes[0] * cfg.q_shapes[1] * cfg.q_shapes[2],
        tt_p_shapes=cfg.p_shapes,
        tt_q_shapes=cfg.q_shapes,
        tt_ranks=cfg.ranks,
        variant=variant,
    )
    tt_config = table("grt")
    # validate_inputs=False: time the kernels, not the module-level id check (a host sync on CUDA)
    bags = {v: TTEmbeddingBag(table(v), device=device, validate_inputs=False) for v in ("grt", "tt")}
    bags["tt"].load_state_dict(bags["grt"].state_dict())
    dense = torch.nn.EmbeddingBag(cfg.num_rows, tt_config.embedding_dim, mode="sum", sparse=True, device=device)
    indices, offsets = zipf_bags(cfg.num_rows, cfg.batch_size, cfg.pooling_factor, alpha=alpha, seed=seed)
    counts = count_ops(tt_config, indices, offsets)
    # The same batch priced with every slot on the segment path (what the kernels did before the
    # row path), to relate the achieved rate to the older FLOP count.
    segment_path = op_counts_from_stats(tt_config, counts.batch_size, counts.num_lookups, counts.num_segments,
                                        counts.num_distinct_groups, row_path=RowPathStats())
    indices, offsets = indices.to(device), offsets.to(device)
    grad = torch.randn(cfg.batch_size, tt_config.embedding_dim, device=device)

    def forward(variant: str) -> Callable[[], None]:
        module = dense if variant == "dense" else bags[variant]
        args = (indices, offsets[:-1]) if variant == "dense" else (indices, offsets)

        def fwd() -> None:  # inference: without autograd, grt builds no plan (docs/design.md 3.4)
            with torch.no_grad():
                module(*args)

        def fwd_recorded() -> None:  # a training step's forward: grt builds the plan for backward
            module(*args)

        def fwd_bwd() -> None:
            module.zero_grad(set_to_none=True)
            module(*args).backward(grad)

        return fwd, fwd_recorded, fwd_bwd

    variants = ["grt", "tt", "dense"]
    fns = {(v, phase): f for v in variants for phase, f in zip(("fwd", "fwd_recorded", "fwd_bwd"), forward(v))
           if phase != "fwd_recorded" or v == "grt"}
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads > 1:
        fns[("grt", "fwd_1thread")] = on_one_thread(fns[("grt", "fwd")])
    # The roof is timed in every repeat too, next to the variants: the machine's speed drifts by
    # tens of percent between minutes, so a roof measured once would not match the samples.
    fns[("mm", "roof")] = mm_call(device)
    for fn in fns.values():
        _time(fn, device, warmup)
    samples: Dict[str, List[float]] = {f"{v}/{p}": [] for v, p in fns}
    for _ in tqdm(range(repeats), desc=f"{cfg.name} on {device.type}", leave=False):
        for (v, p), fn in fns.items():
            samples[f"{v}/{p}"].append(_time(fn, device, 1 if v == "mm" else iters))
    del fns[("mm", "roof")]
    mm_samples = samples.pop("mm/roof")
    mm_flops_per_s = 2 * MM_SIZE**3 / statistics.median(mm_samples)
    medians = {k: statistics.median(s) for k, s in samples.items()}
    phases = grt_phases(fns[("grt", "fwd_bwd")], device, max(1, iters))
    phases["inference_phases_ms"] = grt_phases(fns[("grt", "fwd")], device, max(1, iters))["phases_ms"]
    flops = {"grt/fwd": counts.grt_flops, "grt/fwd_recorded": counts.grt_flops, "tt/fwd": counts.tt_flops,
             "grt/fwd_bwd": counts.grt_flops + counts.grt_backward_flops,
             "tt/fwd_bwd": counts.tt_flops + counts.tt_backward_flops}
    thread_speedup = {}
    if threads > 1:
        per_repeat = [one / many for one, many in zip(samples["grt/fwd_1thread"], samples["grt/fwd"])]
        thread_speedup = {"threads": threads, "median": statistics.median(per_repeat), "per_repeat": per_repeat}
    return {
        "config": asdict(cfg),
        "op_counts": asdict(counts),
        "compression": tt_config.compression_ratio(),
        "core_bytes": tt_config.storage_bytes(),
        "dense_bytes": tt_config.dense_bytes(),
        "mm_flops_per_s": mm_flops_per_s,
        "mm_samples_ms": [x * 1e3 for x in mm_samples],
        "median_ms": {k: v * 1e3 for k, v in medians.items()},
        "samples_ms": {k: [x * 1e3 for x in s] for k, s in samples.items()},
        "useful_flops_per_s": {k: f / medians[k] for k, f in flops.items()},
        "grt_segment_path_flops": segment_path.grt_flops,
        "grt_fwd_segment_path_flops_per_s": segment_path.grt_flops / medians["grt/fwd"],
        "grt_phases": phases,
        # grt inference forward, one thread / all threads: per repeat and the median.
        "grt_fwd_thread_speedup": thread_speedup,
        "ratios": {
            "tt/grt fwd": medians["tt/fwd"] / medians["grt/fwd"],
            "tt/grt fwd_bwd": medians["tt/fwd_bwd"] / medians["grt/fwd_bwd"],
            "grt/dense fwd": medians["grt/fwd"] / medians["dense/fwd"],
            "grt/dense fwd_bwd": medians["grt/fwd_bwd"] / medians["dense/fwd_bwd"],
            "flops tt/grt fwd": counts.tt_flops / counts.grt_flops,
        },
    }


def plot(record: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        med = res["median_ms"]
        phases, variants = ["fwd", "fwd_bwd"], ["grt", "tt", "dense"]
        colors = {"grt": "tab:green", "tt": "tab:red", "dense": "tab:gray"}
        width = 0.27
        for i, v in enumerate(variants):
            vals = [med[f"{v}/{p}"] for p in phases]
            bars = ax.bar([x + (i - 1) * width for x in range(len(phases))], vals, width, label=v, color=colors[v])
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        c = res["config"]
        speedup = res.get("grt_fwd_thread_speedup")
        threads = f"\ngrt fwd {speedup['median']:.2f}x faster on {speedup['threads']} threads than on 1" if speedup else ""
        ax.set_xticks(range(len(phases)), ["forward", "forward+backward"])
        ax.set_yscale("log")
        ax.set_ylabel("median ms / batch (log scale)")
        ax.set_title(
            f"{c['name']}: {c['num_rows']:,} rows, B={c['batch_size']}, P={c['pooling_factor']}\n"
            f"P_G={res['op_counts']['groups_per_bag']:.1f}, tt/grt fwd {res['ratios']['tt/grt fwd']:.1f}x, "
            f"fwd+bwd {res['ratios']['tt/grt fwd_bwd']:.1f}x, {res['compression']:.0f}x smaller{threads}",
            fontsize=9,
        )
        ax.legend()
    fig.suptitle(f"torchrec_tt embedding bags on {record['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m torchrec_tt.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configs", nargs="+", choices=["paper", "10M"],
                        help="default: paper and 10M")
    parser.add_argument("--batch-size", type=int, help="override every config's batch size")
    parser.add_argument("--pooling-factor", type=int, help="override every config's P")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=None,
                        help="calls per timed sample (default: cpu 3 for paper and 1 for 10M, cuda 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of the row popularity")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    names = args.configs or ["paper", "10M"]
    configs = []
    for name in names:
        cfg = {"paper": PAPER, "10M": TEN_M}[name]
        if device.type == "cuda" and name == "paper" and args.batch_size is None:
            cfg = BenchConfig(**{**asdict(cfg), "batch_size": 4096})
        overrides = {k: v for k, v in (("batch_size", args.batch_size), ("pooling_factor", args.pooling_factor)) if v}
        configs.append(BenchConfig(**{**asdict(cfg), **overrides}))
    def iters_for(cfg: BenchConfig) -> int:
        if args.iters:
            return args.iters
        return 20 if device.type == "cuda" else (1 if cfg.num_rows > 1_000_000 else 3)

    name = device_name(device)
    roof = mm_roof(device)
    record = {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "compiled_kernels": uses_extension(device),
        "repeats": args.repeats,
        "iters_per_sample": {c.name: iters_for(c) for c in configs},
        "zipf_alpha": args.alpha,
        "mm_flops_per_s": roof,
        "results": [
            run_config(c, device, args.repeats, iters_for(c), args.warmup, args.seed, args.alpha) for c in configs
        ],
    }
    peak = fp32_peak(name) if device.type == "cuda" else None
    print(f"device: {name}   compiled kernels: {record['compiled_kernels']}   torch {torch.__version__}   "
          f"large torch.mm at the start: {roof / 1e9:.1f} GFLOP/s")
    for res in record["results"]:
        c, med, oc = res["config"], res["median_ms"], res["op_counts"]
        roof = res["mm_flops_per_s"]  # timed in the same repeats as the variants
        print(f"\n[{c['name']}] rows {c['num_rows']:,} p={c['p_shapes']} q={c['q_shapes']} ranks={c['ranks']} "
              f"B={c['batch_size']} P={oc['pooling_factor']:.1f} P_G={oc['groups_per_bag']:.2f} "
              f"U={oc['num_distinct_groups']}  cores {res['core_bytes'] / 1e6:.2f} MB, "
              f"compression {res['compression']:.1f}x")
        print(f"  large torch.mm in these repeats (the % of mm below): {roof / 1e9:.1f} GFLOP/s")
        print(f"  {'variant':<8}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd GFLOP/s':>13}{'% of mm':>9}"
              + ("  % fp32 peak" if peak else ""))
        for v in ("grt", "tt", "dense"):
            fl = res["useful_flops_per_s"].get(f"{v}/fwd")
            line = f"  {v:<8}{med[f'{v}/fwd']:>10.3f}{med[f'{v}/fwd_bwd']:>12.3f}"
            line += f"{fl / 1e9:>13.1f}{100 * fl / roof:>8.0f}%" if fl else f"{'-':>13}{'-':>9}"
            if peak and fl:
                line += f"  {100 * fl / peak:>10.2f}%"
            print(line)
        rec = res["useful_flops_per_s"]["grt/fwd_recorded"]
        print(f"  grt forward with autograd recording (builds the plan for backward): {med['grt/fwd_recorded']:.3f} ms, "
              f"{rec / 1e9:.1f} GFLOP/s, {100 * rec / roof:.0f}% of mm")
        speedup = res["grt_fwd_thread_speedup"]
        if speedup:
            print(f"  grt forward on 1 thread: {med['grt/fwd_1thread']:.3f} ms, so {speedup['threads']} threads run it "
                  f"{speedup['median']:.2f}x faster (per repeat: "
                  + " ".join(f"{x:.2f}" for x in speedup["per_repeat"]) + ")")
        seg = res["grt_fwd_segment_path_flops_per_s"]
        print(f"  grt fwd over the segment path's FLOPs ({res['grt_segment_path_flops'] / 1e6:.0f} MFLOP instead of "
              f"{oc['grt_flops'] / 1e6:.0f}): {seg / 1e9:.1f} GFLOP/s, {100 * seg / roof:.0f}% of mm")
        print("  ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["ratios"].items()))
        ph = res["grt_phases"]
        print("  grt fwd+bwd phases (ms/call): "
              + ", ".join(f"{k.removeprefix('torchrec_tt::')} {v:.2f}" for k, v in sorted(ph["phases_ms"].items())))
        print("  grt inference forward phases (ms/call): "
              + ", ".join(f"{k.removeprefix('torchrec_tt::')} {v:.3f}"
                          for k, v in sorted(ph["inference_phases_ms"].items())))
        if "cuda_launches_per_fwd_bwd" in ph:
            print(f"  CUDA launches per grt fwd+bwd: {ph['cuda_launches_per_fwd_bwd']:.0f}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_{device.type}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    plot(record, stem + ".png")
    print(f"\nwrote {stem}.json and {stem}.png")
    return record


if __name__ == "__main__":
    main()
