#!/usr/bin/env bash
# Start / stop an MLflow tracking server (sqlite store, local artifacts) in its own process group.
#   infra/mlflow-server.sh start [ROOT] [PORT]   ->  narvl run --tracking-uri http://HOST:PORT
#   infra/mlflow-server.sh stop  [ROOT]
set -euo pipefail
cmd=${1:-start}; root=${2:-$HOME/narvl-mlflow}; port=${3:-5000}
mkdir -p "$root"
case "$cmd" in
  start)
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    setsid mlflow server --backend-store-uri "sqlite:///$root/mlflow.db" \
      --default-artifact-root "$root/artifacts" --host 0.0.0.0 --port "$port" --workers 1 \
      >"$root/server.log" 2>&1 < /dev/null &
    echo $! > "$root/server.pid"
    for _ in $(seq 60); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && { echo "mlflow up on :$port"; exit 0; }; sleep 1; done
    echo "mlflow did not answer /health in 60 s; see $root/server.log" >&2; exit 1 ;;
  stop)
    pid=$(cat "$root/server.pid"); kill -- -"$(ps -o pgid= "$pid" | tr -d ' ')" && rm -f "$root/server.pid" ;;
  *) echo "usage: $0 start|stop [ROOT] [PORT]" >&2; exit 2 ;;
esac
