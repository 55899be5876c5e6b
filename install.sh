#!/usr/bin/env bash
# Install NARVL and its dependencies into the current Python (3.11). Usage: ./install.sh [--dev]
#   CPU machines: torch==2.13.0 resolves to the CPU build.
#   GPU machines: TORCH_INDEX=https://download.pytorch.org/whl/cu128 ./install.sh  (a CUDA build of torch 2.13.0)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"

# 1. torch first: DeepSpeed's setup imports it.
if [[ -n "${TORCH_INDEX:-}" ]]; then
  $PY -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX"
else
  $PY -m pip install -q torch==2.13.0
fi
# 2. DeepSpeed with its CPU communication op prebuilt, so no run pays a ~35 s compile
#    (on a GPU machine drop DS_ACCELERATOR=cpu; ops then build just in time).
if ! $PY -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_SHM_COMM=${DS_BUILD_SHM_COMM:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} \
    $PY -m pip install -q --no-build-isolation deepspeed==0.19.8
fi
# 3. the package and everything else.
$PY -m pip install -q -e ".${extra}"
echo "narvl installed: $($PY -c 'import narvl_model, stages, pipeline; print("ok")')"
