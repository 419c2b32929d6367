"""The MovieLens job with ``--cache-fraction``: warm-up, population, hit rates, same data and seed."""

import pytest

TINY = ["--synthetic-users", "600", "--synthetic-items", "400", "--synthetic-p", "12", "--batch-size", "64",
        "--max-steps", "8", "--eval-users", "200", "--no-progress", "--threads", "1", "--tt-rank", "4",
        "--cache-warmup-steps", "2"]


def test_cache_sizes_side_by_side(pipeline, capsys):
    results = pipeline.main(["--embedding", "grt", "--cache-fraction", "0,0.05"] + TINY)
    assert set(results) == {"grt+cache0", "grt+cache0.05"}
    plain, cached = results["grt+cache0"], results["grt+cache0.05"]
    assert "cache" not in plain and all(t["cache_rows"] == 0 for t in plain["tables"])
    assert all(t["cache_rows"] == 20 for t in cached["tables"])  # 5 % of 400 items
    assert cached["tables"][0]["compression"] < plain["tables"][0]["compression"]  # the cache is counted
    c = cached["cache"]
    assert c["warmup_steps"] == 2
    for phase in ("train", "eval"):
        for table in ("history", "candidate"):
            assert 0 < c[phase][table]["hits"] < c[phase][table]["lookups"], (phase, table, c[phase])
    assert 0.05 < c["history_hit_rate"] < 1.0 and 0.0 < c["tt_work_removed"] < 1.0
    assert c["work_removed"] < c["tt_work_removed"]  # the hits' own adds are counted
    assert c["history_P_G_tt_part"] < c["history_P_G_no_cache"]
    assert c["with_cache_s"] > 0 and c["without_cache_s"] > 0 and 0 < c["ratio_q1"] <= c["ratio"] <= c["ratio_q3"]
    # cache_rows=0 is the plain model: same data and seed give the same AUC.
    again = pipeline.main(["--embedding", "grt"] + TINY)["grt"]
    assert again["eval"]["auc"] == plain["eval"]["auc"]
    report = capsys.readouterr().out
    assert "served by the cache" in report and "hist. hits" in report and "op work -" in report


def test_bad_cache_fraction(pipeline):
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--cache-fraction", "0.5,2"])
