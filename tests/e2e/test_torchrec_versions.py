"""The oldest supported TorchRec, 1.6.1 (the GPU machines'), runs the tests that touch TorchRec's
API the most: planner estimators, table-wise sharding over gloo and the train pipeline.
``launch/test_torchrec_1_6.sh`` (a venv with torchrec 1.6.1 in front of the installed 1.8) runs
the whole suite the same way (README, Quick start); this test keeps that path working in CI."""

import os
import re
import subprocess

from tt_testing import REPO

TORCHREC_FACING_TESTS = [
    "tests/distributed/test_tt_planner.py",
    "tests/distributed/test_tt_sharding.py",
    "tests/distributed/test_tt_train_pipeline.py",
]


def test_torchrec_1_6_runs_the_planner_sharding_and_pipeline_tests(tmp_path) -> None:
    env = dict(os.environ, VENV=str(tmp_path / "venv"))
    done = subprocess.run(["bash", "launch/test_torchrec_1_6.sh", *TORCHREC_FACING_TESTS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "torchrec 1.6.1" in done.stdout, output[-4000:]
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20 and "failed" not in summary and "error" not in summary, summary
