"""Criteo: the Kaggle TSV reader, the synthetic generator and a tiny run of examples/dlrm_criteo.py."""

import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from torchrec_tt.data.criteo import (
    CAT_NAMES,
    KAGGLE_CARDINALITIES,
    CriteoSyntheticConfig,
    capped_kaggle_cardinalities,
    generate_criteo,
    read_criteo_tsv,
    zipf_ranks,
)

from tt_testing import REPO

CARDS = [7, 5, 11, 3] + [13] * 22


def _line(label="0", ints=None, cats=None):
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [format(0x1000 + c, "x") for c in range(26)]
    return "\t".join([label, *ints, *cats])


def _write(tmp_path, lines, name="train.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_reader_preprocesses_ints_hex_missing_fields_and_labels(tmp_path):
    ints = ["", "-3", "0", "1", "99"] + ["2"] * 8  # missing and negative -> 0
    cats = ["", "a", "FF", "00000010"] + ["7e5b2a1c"] * 22  # missing -> id 0; hex any case
    path = _write(tmp_path, [_line("1", ints, cats), _line("0"), _line("1", [""] * 13, [""] * 26)])
    data = read_criteo_tsv(path, CARDS)
    assert len(data) == 3 and data.labels.tolist() == [1.0, 0.0, 1.0]
    expected = torch.log1p(torch.tensor([0, 0, 0, 1, 99] + [2] * 8, dtype=torch.float64)).float()
    torch.testing.assert_close(data.dense[0], expected)
    assert data.sparse[0, :4].tolist() == [0, 0xA % 5, 0xFF % 11, 0x10 % 3]
    assert data.sparse[0, 4] == 0x7E5B2A1C % 13
    assert data.sparse[1].tolist() == [(0x1000 + c) % CARDS[c] for c in range(26)]
    assert data.sparse[2].tolist() == [0] * 26 and data.dense[2].tolist() == [0.0] * 13
    assert read_criteo_tsv(path, CARDS, max_rows=2).labels.tolist() == [1.0, 0.0]
    # One id per sample and feature in the KJT, feature-major as TorchRec lays it out.
    dense, kjt, labels = data.batch(torch.tensor([1, 0]))
    assert kjt.keys() == CAT_NAMES and kjt.lengths().tolist() == [1] * 52
    assert kjt["cat_2"].values().tolist() == [data.sparse[1, 2], data.sparse[0, 2]]
    assert labels.tolist() == [0.0, 1.0] and dense.shape == (2, 13)


@pytest.mark.parametrize(
    "bad, match",
    [
        (_line("0", ints=["1"] * 5 + ["x1"] + ["1"] * 7), r"line 2, column 7 \('I6'\): expected an integer or an empty field, found 'x1'"),
        (_line("0", cats=["a"] * 9 + ["zz"] + ["b"] * 16), r"line 2, column 24 \('C10'\): expected a hex id or an empty field, found 'zz'"),
        (_line("2"), r"line 2, column 1 \('label'\): expected a 0/1 label, found '2'"),
        (_line(""), r"line 2, column 1 \('label'\): expected a 0/1 label, found ''"),
        ("0\t1\t2", r"line 2: expected 40 tab-separated fields .* found 3$"),
        ("\t".join(["1"] * 13 + ["a"] * 26), r"line 2: expected 40 .* found 39 \(Kaggle's test.txt has no label"),
        (_line() + "\textra", r"line 2: expected 40 tab-separated fields .* found 41"),
    ],
)
def test_malformed_file_names_path_line_and_column(tmp_path, bad, match):
    path = _write(tmp_path, [_line(), bad, _line()])
    with pytest.raises(ValueError, match=match) as info:
        read_criteo_tsv(path, CARDS)
    assert str(info.value).startswith(path)


def test_missing_file_empty_file_and_bad_cardinalities(tmp_path):
    missing = tmp_path / "nope" / "train.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_criteo_tsv(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no samples"):
        read_criteo_tsv(str(empty), CARDS)
    with pytest.raises(ValueError, match=r"cardinalities must be 26 ints >= 1, got \[3, 4\]"):
        read_criteo_tsv(_write(tmp_path, [_line()]), [3, 4])


def test_kaggle_cardinalities_capped():
    caps = capped_kaggle_cardinalities()
    assert len(caps) == 26 and max(caps) == 10_000_000 and sum(KAGGLE_CARDINALITIES) == 33_762_577
    assert sorted(caps, reverse=True)[:5] == [10_000_000, 8_351_593, 7_046_547, 5_461_306, 2_202_608]


def test_zipf_ranks_follow_the_power_law():
    u = torch.rand(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(zipf_ranks(1000, 1.1, u), minlength=1000).double()
    assert counts.numel() == 1000
    # log count ~ -s log rank between the head and the tail (the floor flattens rank 1 a bit).
    r = torch.arange(10, 200, dtype=torch.float64)
    slope = torch.linalg.lstsq(torch.stack([torch.log(r + 0.5), torch.ones_like(r)], 1),
                               torch.log(counts[9:199]).unsqueeze(1)).solution[0, 0]
    assert -1.25 < float(slope) < -0.95


def test_generator_statistics_and_determinism():
    cfg = CriteoSyntheticConfig(num_rows=30_000, cardinalities=[50_000] * 4 + [1000] * 21 + [3], seed=3)
    data = generate_criteo(cfg)
    assert data.sparse.shape == (30_000, 26) and data.dense.shape == (30_000, 13)
    assert (data.sparse >= 0).all() and (data.sparse < torch.tensor(cfg.cardinalities)).all()
    assert abs(float(data.labels.mean()) - 0.25) < 0.015  # the positive rate is a target
    assert set(data.labels.unique().tolist()) == {0.0, 1.0} and (data.dense >= 0).all()
    # Long tail: the 1 % hottest ids of a 50k-row table serve most lookups, yet many ids appear.
    counts = torch.bincount(data.sparse[:, 0], minlength=50_000).sort(descending=True).values
    assert counts[:500].sum() > 0.5 * 30_000 and (counts > 0).sum() > 3_000
    assert data.stats()["largest_table_top1pct_share"] == pytest.approx(float(counts[:500].sum()) / 30_000)
    # Hot ids are scattered over the table, not packed at the front.
    assert counts.numel() == 50_000 and torch.bincount(data.sparse[:, 0]).argmax() > 0
    again = generate_criteo(cfg)
    assert torch.equal(again.sparse, data.sparse) and torch.equal(again.labels, data.labels)
    assert torch.equal(again.dense, data.dense)
    other = generate_criteo(CriteoSyntheticConfig(num_rows=1000, cardinalities=cfg.cardinalities, seed=4))
    assert not torch.equal(other.sparse, data.sparse[:1000])


def test_generator_label_is_learnable():
    """A logistic regression on one-hot ids (hot ids only) beats chance clearly on held-out
    samples: the label depends on the ids, not just on noise."""
    cfg = CriteoSyntheticConfig(num_rows=20_000, cardinalities=[20] * 26, seed=1)
    train, test = generate_criteo(cfg).split(0.25)

    def features(d):
        onehot = F.one_hot(d.sparse, 20).flatten(1).double()
        return torch.cat([onehot, d.dense.double()], 1)

    x, y = features(train), train.labels.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=30)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-4 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    from torchrec_tt.train_utils import auc_score

    assert auc_score((features(test) @ w + b).detach(), test.labels) > 0.7


@pytest.mark.parametrize("bad", [dict(num_rows=0), dict(cardinalities=[5] * 25), dict(positive_rate=1.0),
                                 dict(zipf_exponent=1.0), dict(num_pairs=1000)])
def test_generator_rejects_bad_config(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"CriteoSyntheticConfig: {name}="):
        CriteoSyntheticConfig(**bad)


def test_log_loss_matches_reference():
    from torchrec_tt.train_utils import log_loss

    logits, labels = torch.tensor([0.3, -2.0, 1.5]), torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits.double())
    ref = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert log_loss(logits, labels) == pytest.approx(float(ref), rel=1e-12)


@pytest.fixture(scope="module")
def criteo_example():
    """``examples/dlrm_criteo.py`` as a module (the examples are not part of the package)."""
    spec = importlib.util.spec_from_file_location("dlrm_criteo", os.path.join(REPO, "examples", "dlrm_criteo.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["dlrm_criteo"] = module
    spec.loader.exec_module(module)
    return module


def test_example_tables_and_mixed_collection_match_reference(criteo_example):
    """TT tables above the threshold, TorchRec tables below; the mixed collection's pooled
    output equals F.embedding_bag over each table's rows (TT rows materialised from cores)."""
    from torchrec_tt import TTEmbeddingBagConfig

    args = criteo_example.parse_args(["--embedding", "grt", "--tt-threshold-rows", "40", "--tt-rank", "4"])
    cards = [60, 7, 45, 3] + [10] * 22
    tables = criteo_example.build_tables(args, "grt", cards)
    assert [t.name for t in tables if isinstance(t, TTEmbeddingBagConfig)] == ["cat_0", "cat_2"]
    assert all(t.tt_ranks == [4, 4] for t in tables if isinstance(t, TTEmbeddingBagConfig))
    model = criteo_example.build_model(args, tables, sparse_grads=True)
    ebc = model.sparse_arch.embedding_bag_collection
    assert [c.name for c in ebc.embedding_bag_configs()] == CAT_NAMES
    cfg = CriteoSyntheticConfig(num_rows=8, cardinalities=cards, seed=0)
    _, kjt, _ = generate_criteo(cfg).batch(torch.arange(8))
    pooled = ebc(kjt).to_dict()
    for t in tables:
        if isinstance(t, TTEmbeddingBagConfig):
            weight = ebc.tt.full_weight(t.name)
        else:
            weight = ebc.dense.embedding_bags[t.name].weight
        ref = F.embedding_bag(kjt[t.name].values(), weight.detach(), kjt[t.name].offsets(), mode="sum",
                              include_last_offset=True)
        torch.testing.assert_close(pooled[t.name], ref)


def test_example_trains_and_compares(criteo_example, tmp_path):
    """A few hundred steps on small tables: the loss falls and both kinds beat chance clearly."""
    argv = ["--embedding", "grt,dense", "--rows", "24000", "--max-cardinality", "2000", "--tt-threshold-rows", "1000",
            "--tt-rank", "8", "--batch-size", "128", "--epochs", "1", "--no-progress", "--threads", "1",
            "--over-arch", "32", "--dense-arch", "16", "--json", str(tmp_path / "r.json")]
    results = criteo_example.main(argv)
    for kind in ("grt", "dense"):
        r = results[kind]
        assert r["train"]["steps"] == 21_600 // 128
        assert r["train"]["final_loss"] < r["train"]["first_loss"]
        assert r["eval"]["auc"] > 0.6 and r["eval"]["log_loss"] < r["eval"]["base_log_loss"]
    tt = [t for t in results["grt"]["tables"] if t["ranks"] is not None]
    assert [t["table"] for t in tt] == [t["table"] for t in results["grt"]["tables"] if t["rows"] >= 1000]
    assert len(tt) > 10 and all(t["compression"] > 1 for t in tt)
    assert criteo_example.layer_totals(results["dense"])["compression"] == 1.0
    assert (tmp_path / "r.json").exists()
    assert math.isfinite(results["grt"]["train"]["ms_per_step"])


def test_component_builds_a_torchrun_app(components):
    app = components.train_criteo("--max-steps", "5", j="1x2", embedding="grt,dense", rows=1000, data="/d/train.txt")
    cmd = " ".join(app.roles[0].args)
    assert "--nproc_per_node 2" in cmd and "examples/dlrm_criteo.py" in cmd and "--device cpu" in cmd
    assert "--embedding grt,dense" in cmd and "--rows 1000" in cmd and "--data /d/train.txt" in cmd
    assert "--max-steps 5" in cmd
    with pytest.raises(ValueError, match="embedding='grt,sparse'"):
        components.train_criteo(embedding="grt,sparse")
    with pytest.raises(ValueError, match="invalid topology"):
        components.train_criteo(j="0x2")


def test_two_ranks_with_distributed_model_parallel(tmp_path):
    """2 CPU ranks (gloo) through torchrun: TT and TorchRec tables sharded table-wise, the
    eval logits gathered from both ranks (no sample lost or counted twice)."""
    import json
    import subprocess

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "examples", "dlrm_criteo.py"), "--embedding", "grt", "--rows", "2010",
           "--max-cardinality", "500", "--tt-threshold-rows", "400", "--tt-rank", "4", "--batch-size", "64",
           "--max-steps", "6", "--no-progress", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())["grt"]
    assert result["world_size"] == 2 and result["train"]["steps"] == 6
    assert result["eval"]["examples"] == 201 and 0.0 < result["eval"]["auc"] < 1.0
    assert "AUC" in proc.stdout


def test_cache_fraction_fills_the_hottest_rows(criteo_example):
    """--cache-fraction: each TT table caches its most frequent training ids; the share of
    training lookups it serves is the K largest id counts over all lookups (tie-free). A
    torchrec_tt without the cache rejects the flag with a clear error."""
    argv = ["--embedding", "grt", "--rows", "6000", "--max-cardinality", "3000", "--tt-threshold-rows", "2500",
            "--tt-rank", "4", "--batch-size", "256", "--max-steps", "3", "--no-progress", "--threads", "1",
            "--cache-fraction", "0,0.05"]
    if not criteo_example.has_cache():
        with pytest.raises(ValueError, match=r"--cache-fraction \[0.0, 0.05\]: this torchrec_tt has no hot-row cache"):
            criteo_example.main(argv)
        return
    results = criteo_example.main(argv)
    assert "cache" not in results["grt+cache0"]
    cache = results["grt+cache0.05"]["cache"]
    train = generate_criteo(CriteoSyntheticConfig(num_rows=6000, cardinalities=capped_kaggle_cardinalities(3000),
                                                  seed=0)).split(0.1)[0]
    hits = lookups = 0
    assert len(cache["rows"]) == sum(c >= 2500 for c in train.cardinalities)
    for name, k in cache["rows"].items():
        f = CAT_NAMES.index(name)
        counts = torch.bincount(train.sparse[:, f], minlength=train.cardinalities[f])
        assert k == round(0.05 * train.cardinalities[f])
        hits, lookups = hits + int(counts.topk(k).values.sum()), lookups + len(train)
    assert cache["train_hit_rate"]["all_tt"] == pytest.approx(hits / lookups)
    tt = [t for t in results["grt+cache0.05"]["tables"] if t["ranks"] is not None]
    assert tt and all(t["cache_rows"] == cache["rows"][t["table"]] for t in tt)


def test_tt_model_trains_its_torchrec_tables_at_the_dense_rate(criteo_example):
    """Regression: a grt/tt model's TorchRec tables train at --emb-lr (the dense model's
    tuned 1.0), its TT cores at --tt-lr and its cached rows at --cache-lr (default: the
    cores'). They used to share one rate, so the 21 small tables of the TT model trained at
    the cores' 0.1 and the AUC gap to the dense model was mostly theirs."""
    from torchrec_tt import TTEmbeddingBag
    from torchrec_tt.train_utils import Optimizers

    args = criteo_example.parse_args(["--embedding", "grt", "--tt-threshold-rows", "40", "--tt-rank", "4"])
    assert (args.emb_lr, args.tt_lr, args.cache_lr) == (1.0, 0.1, None)
    cards = [60, 7, 45, 3] + [10] * 22
    tables = criteo_example.build_tables(args, "grt", cards, cache_fraction=0.2)
    model = criteo_example.build_model(args, tables, sparse_grads=True)
    tt_bags = [m for m in model.modules() if isinstance(m, TTEmbeddingBag)]
    assert len(tt_bags) == 2 and all(b.config.cache_rows > 0 for b in tt_bags)

    def rates(optimizers):
        return {name: next(g["lr"] for g in optimizers.holding(p).param_groups if any(q is p for q in g["params"]))
                for name, p in model.named_parameters()}

    for cache_lr, expected_cache_lr in ((None, args.tt_lr), (0.5, 0.5)):
        by_name = rates(Optimizers(model, args.lr, args.emb_lr, cache_lr, tt_lr=args.tt_lr))
        for name, rate in by_name.items():
            if name.endswith(".cache_weight"):
                assert rate == expected_cache_lr, name
            elif ".cores." in name:
                assert rate == args.tt_lr, name
            elif "sparse_arch." in name:
                assert rate == args.emb_lr, name
            else:
                assert rate == args.lr, name
        assert sum(".cores." in n for n in by_name) == 6 and sum(n.endswith(".weight") and "embedding_bags" in n
                                                                 for n in by_name) == 24


def test_tt_min_compression_picks_the_largest_rank_per_table(criteo_example):
    """--tt-min-compression: each TT table takes the largest uniform rank whose compression,
    cache counted, stays at the floor (one rank more would break it); an unreachable floor
    raises ValueError naming the table."""
    import dataclasses

    from torchrec_tt import TTEmbeddingBagConfig

    cards = [60_000, 7, 45_000, 3] + [10] * 22
    for extra, fraction in (([], 0.0), (["--cache-fraction", "0.01"], 0.01)):
        args = criteo_example.parse_args(["--embedding", "grt", "--tt-threshold-rows", "1000",
                                          "--tt-min-compression", "20", *extra])
        tt = [t for t in criteo_example.build_tables(args, "grt", cards, fraction) if isinstance(t, TTEmbeddingBagConfig)]
        assert [t.name for t in tt] == ["cat_0", "cat_2"]
        for t in tt:
            rank = t.tt_ranks[0]
            assert t.tt_ranks == [rank, rank] and t.compression_ratio() >= 20 and (t.cache_rows > 0) == (fraction > 0)
            bigger = dataclasses.replace(t, tt_ranks=[rank + 1, rank + 1])
            assert bigger.compression_ratio() < 20
        assert tt[0].tt_ranks[0] > tt[1].tt_ranks[0]  # the larger table affords the higher rank
    args = criteo_example.parse_args(["--embedding", "grt", "--tt-threshold-rows", "1000", "--tt-min-compression", "1e6"])
    with pytest.raises(ValueError, match=r"table 'cat_0': --tt-min-compression 1e\+06 is out of reach; rank 1"):
        criteo_example.build_tables(args, "grt", cards)


def test_tt_cores_rate_warms_up_linearly(criteo_example):
    """--tt-warmup-steps: the TT cores' Adagrad rate rises linearly to --tt-lr over that many
    steps (step t uses tt_lr * (t + 1) / W), then stays; the TorchRec tables, the cached rows and
    the MLPs keep their rates throughout, even when a rate equals the cores'. Default 100 on 1
    rank, 0 on N ranks (fused Adagrad in backward); a warm-up asked for on N ranks raises."""
    from torchrec_tt.train_utils import Optimizers

    args = criteo_example.parse_args(["--embedding", "grt", "--tt-threshold-rows", "40", "--tt-rank", "4"])
    assert args.tt_warmup_steps is None
    assert criteo_example.tt_warmup_steps(args, 1) == criteo_example.DEFAULT_TT_WARMUP_STEPS == 100
    assert criteo_example.tt_warmup_steps(args, 2) == 0
    for argv, world_size in ((["--tt-warmup-steps", "5"], 2), (["--tt-warmup-steps", "-1"], 1)):
        with pytest.raises(ValueError, match="--tt-warmup-steps"):
            criteo_example.tt_warmup_steps(criteo_example.parse_args(argv), world_size)

    cards = [60, 7, 45, 3] + [10] * 22
    model = criteo_example.build_model(args, criteo_example.build_tables(args, "grt", cards, cache_fraction=0.2),
                                       sparse_grads=True)
    optimizers = Optimizers(model, args.lr, 0.4, 0.4, tt_lr=0.4, tt_warmup_steps=4)  # one rate for all tables

    def rates():
        return {name: next(g["lr"] for g in optimizers.holding(p).param_groups if any(q is p for q in g["params"]))
                for name, p in model.named_parameters()}

    for step, expected in enumerate([0.1, 0.2, 0.3, 0.4, 0.4, 0.4]):
        by_name = rates()
        cores = {n: r for n, r in by_name.items() if ".cores." in n}
        assert len(cores) == 6 and all(r == pytest.approx(expected) for r in cores.values()), (step, cores)
        assert all(r == 0.4 for n, r in by_name.items() if "sparse_arch." in n and ".cores." not in n)
        assert all(r == args.lr for n, r in by_name.items() if "sparse_arch." not in n)
        optimizers.step()  # no gradients: the rates advance all the same
