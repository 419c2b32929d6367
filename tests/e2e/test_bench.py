"""``python -m torchrec_tt.bench`` runs end to end on a small batch and writes its JSON and PNG
(no timing is asserted: speed is measured by the benchmark itself, not by tests)."""

import json
import os

import pytest
import torch

from torchrec_tt.bench.__main__ import main


def test_bench_writes_json_and_png(tmp_path):
    record = main(["--configs", "paper", "--batch-size", "32", "--pooling-factor", "4", "--repeats", "1",
                   "--iters", "1", "--warmup", "1", "--out", str(tmp_path)])
    with open(tmp_path / "bench_cpu.json") as f:
        saved = json.load(f)
    assert os.path.getsize(tmp_path / "bench_cpu.png") > 0
    (res,) = saved["results"]
    assert res["config"]["batch_size"] == 32 and res["op_counts"]["num_lookups"] == 32 * 4
    one_thread = {"grt/fwd_1thread"} if torch.get_num_threads() > 1 else set()
    assert set(res["median_ms"]) == {"grt/fwd", "grt/fwd_recorded", "grt/fwd_bwd", "tt/fwd", "tt/fwd_bwd",
                                     "dense/fwd", "dense/fwd_bwd"} | one_thread
    if one_thread:  # the threads' speedup, per repeat, from the one-thread and the default samples
        speedup = res["grt_fwd_thread_speedup"]
        # The thread count was restored after the one-thread samples.
        assert speedup["threads"] == torch.get_num_threads() and len(speedup["per_repeat"]) == 1
        assert speedup["median"] == pytest.approx(res["samples_ms"]["grt/fwd_1thread"][0] / res["samples_ms"]["grt/fwd"][0])
    assert all(v > 0 for v in res["median_ms"].values())
    # Both grt forwards and the training step ran their phases.
    phases = res["grt_phases"]
    assert "torchrec_tt::group_plan" in phases["phases_ms"]
    assert "torchrec_tt::group_plan" not in phases["inference_phases_ms"]
    assert saved["mm_flops_per_s"] > 0 and res["mm_flops_per_s"] > 0 and len(res["mm_samples_ms"]) == 1
    assert record["results"][0]["op_counts"] == res["op_counts"]
