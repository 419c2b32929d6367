"""TorchX components of the end-to-end pipeline (``examples/dlrm_movielens.py``).

Run from the repository root::

    torchx run -s local_cwd launch/components.py:train -j 1x2               # 2 CPU ranks, gloo
    torchx run -s local_cwd launch/components.py:train -j 1x2 --embedding dense
    torchx run -s local_cwd launch/components.py:train -j 1x8 --gpu 8      # 8 GPUs, nccl
    torchx run -s local_cwd launch/components.py:train -j 1x2 --movielens ~/ml-20m/ratings.csv
    torchx run -s kubernetes launch/components.py:train -j 4x8 --gpu 8   # 4 nodes x 8 GPUs

``-j NxM`` starts ``N`` nodes (replicas) of ``M`` processes each: torchrun on every node
meets the others through a c10d rendezvous on the first node (``--rdzv_backend c10d
--rdzv_endpoint <node 0>:<rdzv_port>``), so ranks are ``node * M + local rank``. The
script picks gloo on CPU and nccl when CUDA is available; ranks come from torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), and the
planner's topology puts ``M`` ranks on a host (intra-host vs cross-host bandwidth).
"""

import re
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

SCRIPT = "examples/dlrm_movielens.py"
CRITEO_SCRIPT = "examples/dlrm_criteo.py"
EMBEDDINGS = ("grt", "tt", "dense")
_TOPOLOGY = re.compile(r"^(?:(\d+):)?(\d+)x(\d+)$|^(\d+)$")


def parse_topology(j: str, gpu: int = 0) -> List[int]:
    """``[min_nnodes, nnodes, nproc_per_node]`` from ``[[min:]nnodes x]nproc_per_node``.

    Raises:
        ValueError: ``j`` is malformed, asks for zero nodes or processes, has
            ``min_nnodes > nnodes``, or more processes per node than ``gpu`` GPUs.
    """
    match = _TOPOLOGY.match(j.strip())
    if not match:
        raise ValueError(f"invalid topology -j {j!r}: expected [[min_nnodes:]nnodes x]nproc_per_node, e.g. 1x2 or 2")
    if match.group(4) is not None:
        min_nnodes, nnodes, nproc = 1, 1, int(match.group(4))
    else:
        nnodes, nproc = int(match.group(2)), int(match.group(3))
        min_nnodes = int(match.group(1)) if match.group(1) is not None else nnodes
    if nnodes < 1 or nproc < 1 or min_nnodes < 1:
        raise ValueError(f"invalid topology -j {j!r}: nodes and processes per node must be >= 1")
    if min_nnodes > nnodes:
        raise ValueError(f"invalid topology -j {j!r}: min_nnodes {min_nnodes} > nnodes {nnodes}")
    if gpu > 0 and nproc > gpu:
        raise ValueError(f"invalid topology -j {j!r}: {nproc} processes per node but only gpu={gpu} GPUs per node")
    return [min_nnodes, nnodes, nproc]


def train(
    *script_args: str,
    j: str = "1x2",
    embedding: str = "grt",
    movielens: Optional[str] = None,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    gpu: int = 0,
    cpu: int = 2,
    memMB: int = 8192,
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    name: str = "/torchrec_tt_dlrm",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """DLRM-style training on MovieLens-20M (or synthetic data) with TT embedding tables.

    Every rank runs ``examples/dlrm_movielens.py``; the tables are sharded over the
    ranks with ``DistributedModelParallel`` (gloo on CPU, nccl on GPUs), each TT table
    table-wise or data-parallel as the planner chooses (``--sharding`` overrides).

    Args:
        script_args: more arguments for the script (see ``python examples/dlrm_movielens.py -h``)
        j: topology ``[[min_nnodes:]nnodes x]nproc_per_node``, e.g. ``1x2`` (one node, two
            ranks) or ``2x1`` (two nodes, one rank each, c10d rendezvous)
        embedding: ``grt`` (GRT-GnR TT kernel), ``tt`` (TT-Rec kernel) or ``dense`` (TorchRec tables)
        movielens: path of ML-20M ``ratings.csv`` on the workers; synthetic data if omitted
        epochs: passes over the users (script default if omitted)
        batch_size: batch size per rank (script default if omitted)
        seed: random seed of data, split and model
        gpu: GPUs per replica (0: CPU ranks with gloo)
        cpu: CPUs per replica
        memMB: memory per replica in MB
        image: container image (ignored by the local_cwd scheduler)
        name: job name, ``{experiment}/{run}``
        env: extra environment variables, e.g. ``OMP_NUM_THREADS=1``
        max_retries: scheduler retries
        rdzv_port: port of the c10d rendezvous on the first node

    Returns:
        specs.AppDef: the job.

    Raises:
        ValueError: bad topology ``j`` or unknown ``embedding``.
    """
    parse_topology(j, gpu)
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r} must be one of {EMBEDDINGS}")
    args = ["--embedding", embedding, "--seed", str(seed), "--device", "cuda" if gpu > 0 else "cpu"]
    if movielens:
        args += ["--movielens", movielens]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    return dist.ddp(
        *args,
        *script_args,
        script=SCRIPT,
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )


def train_criteo(
    *script_args: str,
    j: str = "1x2",
    embedding: str = "grt",
    data: Optional[str] = None,
    rows: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    gpu: int = 0,
    cpu: int = 2,
    memMB: int = 16384,
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    name: str = "/torchrec_tt_criteo",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """DLRM on Criteo Kaggle (or its synthetic twin) with the largest tables TT-compressed
    (``torchx run -s local_cwd launch/components.py:train_criteo -j 1x2 --embedding grt``).

    Every rank runs ``examples/dlrm_criteo.py``; the tables (TT and TorchRec ones) are
    sharded table-wise over the ranks with ``DistributedModelParallel`` (gloo on CPU, nccl
    on GPUs).

    Args:
        script_args: more arguments for the script (see ``python examples/dlrm_criteo.py -h``)
        j: topology ``[[min_nnodes:]nnodes x]nproc_per_node``, e.g. ``1x2``
        embedding: ``grt``, ``tt`` or ``dense``, or a comma list of them (compared in one job)
        data: path of Criteo Kaggle ``train.txt`` on the workers; synthetic data if omitted
        rows: synthetic samples (script default if omitted)
        batch_size: batch size per rank (script default if omitted)
        seed: random seed of data and model
        gpu: GPUs per replica (0: CPU ranks with gloo)
        cpu: CPUs per replica
        memMB: memory per replica in MB (the dense baseline holds 2 GB of tables and as much
            Adagrad state)
        image: container image (ignored by the local_cwd scheduler)
        name: job name, ``{experiment}/{run}``
        env: extra environment variables, e.g. ``OMP_NUM_THREADS=1``
        max_retries: scheduler retries

    Returns:
        specs.AppDef: the job.

    Raises:
        ValueError: bad topology ``j`` or an unknown ``embedding``.
    """
    parse_topology(j, gpu)
    kinds = [k.strip() for k in embedding.split(",")]
    if not all(k in EMBEDDINGS for k in kinds):
        raise ValueError(f"embedding={embedding!r} must be one of {EMBEDDINGS} or a comma list of them")
    args = ["--embedding", embedding, "--seed", str(seed), "--device", "cuda" if gpu > 0 else "cpu"]
    if data:
        args += ["--data", data]
    if rows is not None:
        args += ["--rows", str(rows)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    return dist.ddp(*args, *script_args, script=CRITEO_SCRIPT, image=image, name=name, cpu=cpu, gpu=gpu,
                    memMB=memMB, j=j, env=env, max_retries=max_retries)
