"""The training pipeline: AUC metric, one-process runs, a 2-rank DMP run, launch components."""

import json
import os
import subprocess
import sys

import pytest
import torch

from torchrec_tt.data.task import LikedTask

from tt_testing import REPO

TINY = ["--synthetic-users", "600", "--synthetic-items", "400", "--synthetic-p", "12", "--batch-size", "64",
        "--max-steps", "6", "--eval-users", "200", "--no-progress", "--threads", "1", "--tt-rank", "4"]


def test_auc_matches_pair_counting(pipeline):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (300,), generator=g).float()  # many ties
    labels = (torch.rand(300, generator=g) < 0.4).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert pipeline.auc_score(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert pipeline.auc_score(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="positives and negatives"):
        pipeline.auc_score(torch.ones(3), torch.ones(3))


@pytest.mark.parametrize("embedding", ["grt", "tt", "dense"])
def test_one_process_run_reports_everything(pipeline, embedding, tmp_path, capsys):
    out = tmp_path / "r.json"
    result = pipeline.main(["--embedding", embedding, "--json", str(out), "--save", str(tmp_path / "{embedding}.pt")]
                           + TINY)[embedding]
    assert result["train"]["steps"] == 6 and result["train"]["examples_per_second"] > 0
    assert 0.0 <= result["eval"]["auc"] <= 1.0 and result["eval"]["examples"] == 400
    groups = result["groups"]
    assert groups["renumber"] == "cluster"
    assert groups["none"]["pooling_factor"] == groups["cluster"]["pooling_factor"]
    assert groups["cluster"]["groups_per_bag"] <= groups["none"]["groups_per_bag"]
    tables = {t["table"]: t for t in result["tables"]}
    assert set(tables) == {"history", "candidate"}
    if embedding == "dense":
        assert tables["history"]["compression"] == 1.0
    else:
        assert tables["history"]["compression"] > 1.0
    assert json.loads(out.read_text())[embedding]["embedding"] == embedding
    report = capsys.readouterr().out
    for needle in ("compression", "P_G: before renumbering", "AUC =", "examples/s"):
        assert needle in report
    # The renumbering travels with the model.
    state = torch.load(tmp_path / f"{embedding}.pt")
    assert state["renumber.mapping"].shape == (400,)


# Small enough for seconds on 2 shared cores, big enough that the model beats item popularity.
LEARNS = ["--synthetic-users", "2000", "--synthetic-items", "400", "--synthetic-p", "20", "--batch-size", "128",
          "--epochs", "4", "--eval-users", "0", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("embedding, extra", [("grt", ["--tt-rank", "8", "--emb-lr", "0.3"]), ("dense", [])])
def test_tiny_run_learns_more_than_popularity(pipeline, embedding, extra):
    """The eval AUC beats scoring each candidate by its training popularity, computed here on
    the same held-out examples (the README: popularity alone scores about 0.53)."""
    argv = LEARNS + extra
    result = pipeline.main(["--embedding", embedding] + argv)[embedding]
    args = pipeline.parse_args(argv)
    task = LikedTask(pipeline.load_data(args), negatives=args.negatives, train_positives=args.train_positives,
                     train_negatives=args.train_negatives, test_negatives=args.test_negatives, seed=args.seed)
    test = task.test_examples(args.eval_users or None)
    assert result["eval"]["examples"] == len(test) == 4000
    popularity = pipeline.auc_score(task.item_counts[test.candidates].double(), test.labels)
    assert 0.5 < popularity < 0.56, popularity
    assert result["train"]["steps"] == 500
    assert result["eval"]["auc"] > popularity + 0.1, (result["eval"]["auc"], popularity)


def test_one_command_compares_kinds_on_the_same_data(pipeline, capsys):
    both = pipeline.main(["--embedding", "grt,dense"] + TINY)
    assert list(both) == ["grt", "dense"]
    assert both["grt"]["train"]["steps"] == both["dense"]["train"]["steps"]
    assert both["grt"]["groups"] is both["dense"]["groups"]  # one data preparation
    assert "compression" in capsys.readouterr().out.split("== dense")[-1]
    again = pipeline.main(["--embedding", "grt"] + TINY)["grt"]  # same seed, same result
    assert again["eval"]["auc"] == both["grt"]["eval"]["auc"]
    assert again["train"]["final_loss"] == both["grt"]["train"]["final_loss"]
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--embedding", "grt,sparse"])


def test_movielens_file_run(pipeline, tmp_path, write_ratings):
    g = torch.Generator().manual_seed(0)
    rows = [(u, int(m), 4.0 + float(torch.rand(1, generator=g) < 0.3), 0)
            for u in range(1, 120) for m in torch.randperm(300, generator=g)[:15]]
    path = write_ratings(tmp_path / "ratings.csv", rows)
    result = pipeline.main(["--embedding", "grt", "--movielens", path, "--batch-size", "32", "--max-steps", "3",
                            "--no-progress", "--threads", "1", "--tt-rank", "4"])["grt"]
    assert result["data"]["source"] == path and result["data"]["users"] == 119


def test_two_ranks_with_distributed_model_parallel(tmp_path):
    """2 CPU ranks (gloo) through torchrun, TT tables sharded table-wise by the plugin."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "examples", "dlrm_movielens.py"), "--embedding", "grt", "--json", str(out)] + TINY
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())["grt"]
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["train"]["steps"] == 6
    assert result["eval"]["examples"] == 400  # padding of the last eval batch is dropped
    assert "AUC =" in proc.stdout


def test_component_builds_a_torchrun_app(components):
    app = components.train("--max-steps", "5", j="1x2", embedding="dense", epochs=1)
    role = app.roles[0]
    cmd = " ".join(role.args)
    assert "--nproc_per_node 2" in cmd and "examples/dlrm_movielens.py" in cmd
    assert "--embedding dense" in cmd and "--epochs 1" in cmd and "--max-steps 5" in cmd and "--device cpu" in cmd
    gpu_app = components.train(j="1x2", gpu=2)
    assert "--device cuda" in " ".join(gpu_app.roles[0].args) and gpu_app.roles[0].resource.gpu == 2


@pytest.mark.parametrize("j", ["1x2x3", "x2", "0x2", "1x0", "3:2x1", "two"])
def test_component_rejects_bad_topology(components, j):
    with pytest.raises(ValueError, match="invalid topology"):
        components.train(j=j)


def test_component_rejects_bad_args(components):
    with pytest.raises(ValueError, match="gpu=1 GPUs"):
        components.train(j="1x2", gpu=1)
    with pytest.raises(ValueError, match="embedding='sparse'"):
        components.train(embedding="sparse")
    assert components.parse_topology("4") == [1, 1, 4]
    assert components.parse_topology("1:2x8", gpu=8) == [1, 2, 8]


def test_torchx_cli_dryrun():
    """`torchx run -s local_cwd launch/components.py:train -j 1x2` resolves the component."""
    torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
    if not os.path.exists(torchx):
        pytest.skip("torchx CLI not installed next to this python")
    proc = subprocess.run([torchx, "run", "--dryrun", "-s", "local_cwd", "launch/components.py:train", "-j", "1x2",
                           "--embedding", "grt"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "examples/dlrm_movielens.py" in proc.stdout and "--nproc_per_node 2" in proc.stdout


def test_bf16_cores_and_conversion_from_dense(pipeline, tmp_path):
    """--tt-data-type bf16 stores half the core bytes; --init-from-dense converts a saved dense
    model's tables (convert_ebc_to_tt) and evaluates it (0 steps) like the dense model would."""
    bf16 = pipeline.main(["--embedding", "grt", "--tt-data-type", "bf16"] + TINY)["grt"]
    fp32 = pipeline.main(["--embedding", "grt"] + TINY)["grt"]
    assert [t["bytes"] * 2 for t in bf16["tables"]] == [t["bytes"] for t in fp32["tables"]]
    assert 0.0 <= bf16["eval"]["auc"] <= 1.0
    path = tmp_path / "dense.pt"
    dense = pipeline.main(["--embedding", "dense", "--save", str(path)] + TINY)["dense"]
    tiny0 = [a if a != "6" else "0" for a in TINY]  # --max-steps 0: evaluate the converted model
    converted = pipeline.main(["--embedding", "grt", "--init-from-dense", str(path), "--convert-max-error", "1e-6",
                               "--tt-rank", "4"] + tiny0)["grt"]
    report = converted["conversion"]
    assert set(report) == {"history", "candidate"} and all(r["rel_error"] < 1e-5 for r in report.values())
    assert converted["eval"]["auc"] == pytest.approx(dense["eval"]["auc"], abs=1e-3)
