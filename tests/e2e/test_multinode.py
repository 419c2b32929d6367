"""``-j 2x1``: two local "nodes" of one rank each, through the torchx component's multi-node
path (a torchrun per node, c10d rendezvous on node 0), on the local_cwd scheduler."""

import json
import os
import socket

from torchx.runner import get_runner
from torchx.specs import AppState

from tt_testing import REPO

TINY = ["--synthetic-users", "600", "--synthetic-items", "400", "--synthetic-p", "12", "--batch-size", "64",
        "--max-steps", "4", "--eval-users", "200", "--no-progress", "--threads", "1", "--tt-rank", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_through_the_torchx_component(components, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    app = components.train(*TINY, "--json", str(out), j="2x1", env=env, rdzv_port=_free_port())
    role = app.roles[0]
    assert role.num_replicas == 2 and "--nnodes 2 --nproc_per_node 1" in role.args[-1]
    assert "--rdzv_backend c10d" in role.args[-1]
    monkeypatch.chdir(REPO)  # local_cwd runs the script from the current directory
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        status = runner.wait(handle, wait_interval=1)
    logs = "".join(open(os.path.join(d, f)).read()[-2000:] for d, _, fs in os.walk(tmp_path / "logs") for f in fs)
    assert status is not None and status.state == AppState.SUCCEEDED, (status, logs)
    result = json.loads(out.read_text())["grt"]
    # Two nodes of one rank: world size 2, one rank per host.
    assert (result["world_size"], result["local_world_size"]) == (2, 1)
    assert result["train"]["steps"] == 4 and len(result["train"]["tt_compute_ms_per_rank"]) == 2
    assert set(result["sharding"]) == {"history", "candidate"}
