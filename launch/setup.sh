#!/usr/bin/env bash
# One-time set-up on a fresh CPU machine (idempotent): the pinned CPU stack, then the
# project built in place with its C++ ops (and CUDA ops when torch has CUDA).
# torchrec's metadata asks for the CUDA fbgemm-gpu wheel (~450 MiB), so it is installed
# with --no-deps next to fbgemm-gpu-cpu and its small dependencies.
# Supported torch: 2.11 to 2.13 (2.13.0 is installed when there is none; the GPU machines
# run 2.11). Any pip failure fails this script (pip's noisy warnings are filtered out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_MIN=2.11
TORCH_MAX=2.13

# Drop pip's warning lines; grep exits 1 when it drops everything, which is not a failure
# (2 would be). With pipefail the pipeline then fails exactly when pip does.
filter_pip() { grep -v -e "^WARNING" -e "dependency conflicts" -e "requires fbgemm-gpu" || [ $? -eq 1 ]; }
pip_install() {
  if ! "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | filter_pip; then
    echo "setup.sh: pip install $* failed" >&2
    exit 1
  fi
}

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
if ! "$PY" - "$TORCH_MIN" "$TORCH_MAX" <<'EOF'
import sys
import torch

def minor(version):
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)

low, high = minor(sys.argv[1]), minor(sys.argv[2])
if not low <= minor(torch.__version__) <= high:
    sys.exit(f"setup.sh: torch {torch.__version__} is installed, but torchrec_tt supports torch "
             f"{sys.argv[1]} to {sys.argv[2]} (pinned: 2.13.0 on CPU, 2.11 on the GPU machines); "
             f"install one of those, e.g. pip install torch==2.13.0")
EOF
then
  exit 1
fi
if ! "$PY" -c "import torchrec, fbgemm_gpu" 2>/dev/null; then
  pip_install --no-deps "torchrec==1.8.0" "fbgemm-gpu-cpu==1.8.0"
fi
pip_install "tensordict" "torchmetrics==1.0.3" "pyre-extensions" "iopath" "tqdm" "torchx==0.7.0" \
  "matplotlib" "ninja" "pytest" "hypothesis"
# --no-build-isolation: an isolated build would ignore the installed torch and fetch CUDA torch.
pip_install --no-deps --no-build-isolation -e .
"$PY" -c "import torchrec_tt, torch; print('torchrec_tt', torchrec_tt.__version__, '| compiled ops:', torchrec_tt.HAS_EXTENSION, '| torch', torch.__version__)"
