#!/usr/bin/env bash
# Install NARVL into the project virtual environment `.venv` (created on first use), so that the same two
# commands work everywhere, including where the system Python refuses pip installs (PEP 668: Debian 12,
# Ubuntu 24.04):
#   ./install.sh        && .venv/bin/narvl run
#   ./install.sh --dev  && .venv/bin/python -m pytest -q
# Environment:
#   PYTHON=python3.11        the interpreter that creates the environment (3.11 or 3.12; default: python3.11,
#                            else python3)
#   NARVL_VENV=/opt/venv     another place for the environment (the container image uses this)
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128   a CUDA build of torch 2.13.0 (GPU machines); without
#                            it, torch==2.13.0 resolves to the CPU build
#   DS_ACCELERATOR=cpu|cuda  which DeepSpeed ops to prebuild (default cpu: the CPU communication op; with cuda,
#                            no op is prebuilt and DeepSpeed builds the ones a run needs just in time)
set -euo pipefail
cd "$(dirname "$0")"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument '$arg' (expected --dev or --help)" >&2; exit 2 ;;
  esac
done

venv=${NARVL_VENV:-.venv}
if [[ ! -x "$venv/bin/python" ]]; then
  base=${PYTHON:-}
  if [[ -z "$base" ]]; then
    base=$(command -v python3.11 || command -v python3 || true)
  fi
  [[ -n "$base" ]] || { echo "install.sh: no python3.11 or python3 on PATH (set PYTHON=...)" >&2; exit 1; }
  if ! "$base" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)'; then
    echo "install.sh: $base is Python $("$base" -c 'import platform; print(platform.python_version())'); NARVL needs 3.11 or 3.12 (set PYTHON=...)" >&2
    exit 1
  fi
  echo "creating $venv with $base"
  "$base" -m venv "$venv" || {
    echo "install.sh: '$base -m venv' failed; on Debian/Ubuntu install the venv module (apt-get install python3-venv)" >&2
    exit 1
  }
fi
PY="$venv/bin/python"
pip() { "$PY" -m pip install -q "$@"; }

# 0. build tools for DeepSpeed's source build (a 3.12 venv ships no setuptools).
pip "setuptools>=68" wheel
# 1. torch first: DeepSpeed's setup imports it.
if [[ -n "${TORCH_INDEX:-}" ]]; then
  pip torch==2.13.0 --index-url "$TORCH_INDEX"
else
  pip torch==2.13.0
fi
# 2. DeepSpeed. On CPU its communication op is prebuilt, so no run pays a ~35 s compile; with
#    DS_ACCELERATOR=cuda nothing is prebuilt (ops build just in time on the first run that needs them).
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  accel=${DS_ACCELERATOR:-cpu}
  if [[ "$accel" == cpu ]]; then
    DS_BUILD_SHM_COMM=${DS_BUILD_SHM_COMM:-1} DS_ACCELERATOR=cpu pip --no-build-isolation deepspeed==0.19.8
  else
    DS_ACCELERATOR="$accel" pip --no-build-isolation deepspeed==0.19.8
  fi
fi
# 3. the package and everything else.
if (( dev )); then pip -e ".[dev]"; else pip -e .; fi
echo "narvl installed in $venv: $("$PY" -c 'import narvl_model, stages, pipeline; print("ok")')"
echo "run it with $venv/bin/narvl (or: source $venv/bin/activate)"
