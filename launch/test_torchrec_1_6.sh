#!/usr/bin/env bash
# The test suite against TorchRec 1.6.1, the GPU machines' TorchRec (docs/design.md section 7), on
# a CPU machine set up by launch/setup.sh: a venv over the installed packages with torchrec 1.6.1
# in front of 1.8, and this checkout's torchrec_tt (built in place) on PYTHONPATH. fbgemm-gpu-cpu
# and torch stay as installed (1.6.0's ops are built for torch 2.11), so this checks TorchRec's
# Python API (sharders, planner estimators, KJT, pipelines) across the supported range.
#   bash launch/test_torchrec_1_6.sh [pytest args]    (default: the whole suite, ~5 min on 2 cores)
# One skip more than the plain run: the torchx CLI is not installed next to the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/torchrec_tt_venv_torchrec161}
if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv --system-site-packages "$VENV"
fi
if [[ $("$VENV/bin/python" -c 'import torchrec; print(torchrec.__version__)' 2>/dev/null) != 1.6.1 ]]; then
  # pip's notes on the local index folders are noise; a pip failure still fails the script (pipefail).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps torchrec==1.6.1 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
fi
"$VENV/bin/python" -c 'import torch, torchrec; print(f"torch {torch.__version__}, torchrec {torchrec.__version__}")'
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
