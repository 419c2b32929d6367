#!/usr/bin/env bash
# The main job: DLRM-style training (examples/dlrm_movielens.py) on 2 CPU ranks (gloo,
# DistributedModelParallel, TT tables table-wise or data-parallel as the planner chooses; --sharding tw
# forces table-wise) with the synthetic MovieLens-20M twin and
# default settings. Prints per-table memory and compression, P and P_G before/after renumbering,
# AUC and throughput. Runs launch/setup.sh first if the package is not installed yet.
#
#   bash launch/setup.sh && bash launch/main_job.sh     # the README's main-job command
#   bash launch/main_job.sh --embedding dense           # extra args go to the script
#   NPROC=2 LAUNCHER=torchx bash launch/main_job.sh     # through the torchx component
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-2}
PYTHON=${PYTHON:-python3}
t0=$(date +%s)
if ! "$PYTHON" -c "import torchrec_tt, torchx" 2>/dev/null; then
  bash launch/setup.sh
fi
if [ "${LAUNCHER:-torchrun}" = torchx ]; then
  torchx run -s local_cwd launch/components.py:train -j "1x$NPROC" -- "$@"
else
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    examples/dlrm_movielens.py "$@"
fi
echo "main job done in $(( $(date +%s) - t0 )) s"
