#!/usr/bin/env bash
# Issue 15's GPU check, for a fresh GPU machine from a clean checkout (budget: 8 minutes including install).
#
#   bench/gpu_check.sh 2>&1 | tee gpu_check.log
#
# Python: $PYTHON when set; else .venv/bin/python when install.sh made one; else python3. When that Python
# cannot import torch with CUDA and the project, runs TORCH_INDEX=${TORCH_INDEX:-cu128 wheels} ./install.sh
# (which needs the package index; on an offline machine install beforehand and set PYTHON).
# Knobs: GPU_CHECK_OUT (work folder, default a new temp dir), GPU_CHECK_LATENCY_S (time for the latency
# benchmark, default 200), GPU_CHECK_SMOKE_S (per pipeline run, default 150), GPU_CHECK_TESTS=0 to skip the
# `gpu` tests (also skipped past 6 minutes), GPU_CHECK_RESUME=0 to skip the interrupted-run check.
#
# Without Ray and MLflow on the machine (a bare GPU image plus torch, DeepSpeed and pydantic) everything but the
# pipeline smoke (a') runs.
# Prints: the GPU; (b) batch-1 latency per task, AR beam 5 / AR greedy / NARVL, eager, CUDA graphs and
# torch.compile, mean / p50 / p90 and speed-ups; (c) NARVL latency vs 10-1000 queries; (d) throughput at batch
# 1 / 8 / 32 / 128; PASS/FAIL per latency target; (a) the training stages on CUDA (tests/test_gpu_training.py: loss
# falls, resume after an interruption); (a') the pipeline smoke through Ray; the `gpu` inference tests. Copy the figures into docs/REPRODUCTION.md ("GPU latency") with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
out=${GPU_CHECK_OUT:-$(mktemp -d -t narvl-gpu-check-XXXX)}
mkdir -p "$out"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR  # the GPU path must pick the CUDA accelerator itself

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif [[ -x .venv/bin/python ]]; then echo .venv/bin/python
  else echo python3; fi
}
ready() { "$1" -c "import torch, deepspeed, pydantic, narvl_model, stages; assert torch.cuda.is_available()" 2>/dev/null; }
has_pipeline() { "$1" -c "import ray, mlflow, pipeline" 2>/dev/null; }

PY=$(pick_python)
if ! ready "$PY"; then
  echo "== install (torch with CUDA from ${TORCH_INDEX:=https://download.pytorch.org/whl/cu128})"
  PYTHON=$PY TORCH_INDEX=$TORCH_INDEX DS_ACCELERATOR=cuda DS_BUILD_SHM_COMM=0 ./install.sh --dev || echo "install.sh failed"
  PY=$(pick_python)
  if ! ready "$PY"; then
    echo "FAIL: $PY cannot import torch with CUDA and the project; set PYTHON to an interpreter that can"
    exit 1
  fi
fi
echo "== python: $PY ($($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "(setup: $((SECONDS - start)) s; work folder $out)"

echo
echo "== latency, base preset (OFA-base sizes, 480 px, OFA's vocabulary), bf16"
"$PY" -m bench.gpu_latency --preset base --budget-s "${GPU_CHECK_LATENCY_S:-200}" --json "$out/latency.json"
echo "(after latency: $((SECONDS - start)) s)"

echo
echo "== (a) GPU training, stages on CUDA in this process (teacher bf16 ZeRO-2: loss falls; killed after a checkpoint,"
echo "   resumes to the step and weights of the uninterrupted run; NARVL Q-CTC; evaluate and benchmark on CUDA)"
"$PY" -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu_training.py 2>&1 | grep -v "Warning\|warnings.warn"
echo "(after stage training: $((SECONDS - start)) s)"

echo
if ! has_pipeline "$PY"; then
  echo "== (a') pipeline smoke skipped: $PY cannot import Ray and MLflow (install.sh --dev installs them)"
else
  echo "== (a') GPU pipeline smoke: smoke profile, captioning, use_gpu=true, bf16, ZeRO-2, 1 GPU, through Ray"
  resume=()
  [[ "${GPU_CHECK_RESUME:-1}" == 0 ]] && resume=(--skip-resume)
  "$PY" -m bench.gpu_train_smoke --root "$out/smoke" --timeout-s "${GPU_CHECK_SMOKE_S:-150}" "${resume[@]}"
  echo "(after pipeline smoke: $((SECONDS - start)) s)"
fi

echo
if [[ "${GPU_CHECK_TESTS:-1}" == 0 ]]; then
  echo "== gpu inference tests skipped (GPU_CHECK_TESTS=0)"
elif (( SECONDS - start > 420 )); then
  echo "== gpu inference tests skipped (8-minute budget): $PY -m pytest -q -m gpu tests/test_fast_inference.py"
else
  echo "== gpu inference tests (pytest -m gpu)"
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_inference.py
fi
echo
echo "gpu_check done in $((SECONDS - start)) s; figures in $out/latency.json"
