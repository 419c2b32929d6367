#!/usr/bin/env bash
# One-time set-up on a fresh CPU machine (idempotent): the pinned CPU stack, then the
# project built in place with its C++ ops (and CUDA ops when torch has CUDA).
# torchrec's metadata asks for the CUDA fbgemm-gpu wheel (~450 MiB), so it is installed
# with --no-deps next to fbgemm-gpu-cpu and its small dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v -e "^WARNING" -e "dependency conflicts" -e "requires fbgemm-gpu" || true; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
"$PY" -c "import torch; assert torch.__version__.startswith(('2.1',)), torch.__version__" >/dev/null
if ! "$PY" -c "import torchrec, fbgemm_gpu" 2>/dev/null; then
  pip_install --no-deps "torchrec==1.8.0" "fbgemm-gpu-cpu==1.8.0"
fi
pip_install "tensordict" "torchmetrics==1.0.3" "pyre-extensions" "iopath" "tqdm" "torchx==0.7.0" \
  "matplotlib" "ninja" "pytest" "hypothesis"
# --no-build-isolation: an isolated build would ignore the installed torch and fetch CUDA torch.
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
"$PY" -c "import torchrec_tt, torch; print('torchrec_tt', torchrec_tt.__version__, '| compiled ops:', torchrec_tt.HAS_EXTENSION, '| torch', torch.__version__)"
