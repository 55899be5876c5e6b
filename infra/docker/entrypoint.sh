#!/usr/bin/env bash
# Container entrypoint: decide DeepSpeed's accelerator at run time, then run the command.
# DS_ACCELERATOR set by the caller (docker -e, the pod's env) wins; otherwise cuda when nvidia-smi lists a GPU,
# else cpu (DeepSpeed's CPU path with the gloo backend).
set -euo pipefail
if [[ -z "${DS_ACCELERATOR:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    export DS_ACCELERATOR=cuda
  else
    export DS_ACCELERATOR=cpu
  fi
fi
mkdir -p "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" 2>/dev/null || true
[[ $# -gt 0 ]] || set -- narvl --help
exec "$@"
