#!/usr/bin/env bash
# MLflow tracking server for NARVL: a database backend, artifacts proxied by the server (clients upload through
# it and need no storage credentials), optional basic auth, bound to 127.0.0.1 unless asked otherwise.
#   infra/mlflow/server.sh start  [ROOT]   background, in its own process group; waits for /health
#   infra/mlflow/server.sh stop   [ROOT]   stops that process group
#   infra/mlflow/server.sh run    [ROOT]   foreground (containers, Kubernetes)
#   infra/mlflow/server.sh health [ROOT]   exit 0 when /health answers
# ROOT (default ~/narvl-mlflow) holds the pid file, the log and, by default, the sqlite stores and artifacts.
# Environment (all optional):
#   MLFLOW_HOST=127.0.0.1  MLFLOW_PORT=5000  MLFLOW_WORKERS=1
#   MLFLOW_BACKEND_STORE_URI   default sqlite:///ROOT/mlflow.db; on a cluster postgresql+psycopg2://user:pw@host:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  default ROOT/mlartifacts; on a cluster s3://bucket/mlflow (the server, not the
#                              clients, needs AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and
#                              MLFLOW_S3_ENDPOINT_URL for an S3-compatible store)
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD   turn basic auth on (MLflow's basic-auth app); the
#                              admin is created on first start. Clients: MLFLOW_TRACKING_USERNAME / _PASSWORD.
#   MLFLOW_FLASK_SERVER_SECRET_KEY   the auth app's CSRF key (same on every replica); default: generated once
#                              into ROOT/flask_secret_key
#   MLFLOW_AUTH_DATABASE_URI   the auth app's user store, default sqlite:///ROOT/basic_auth.db
#   MLFLOW_ALLOW_NO_AUTH=1     allow a non-loopback MLFLOW_HOST without auth (refused otherwise)
set -euo pipefail
cmd=${1:-}; root=${2:-$HOME/narvl-mlflow}
host=${MLFLOW_HOST:-127.0.0.1}; port=${MLFLOW_PORT:-5000}
health_url="http://127.0.0.1:$port/health"
[[ "$host" == 0.0.0.0 || "$host" == 127.0.0.1 || "$host" == localhost ]] || health_url="http://$host:$port/health"

server_args() {
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
  local backend=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$root/mlflow.db}
  local dest=${MLFLOW_ARTIFACTS_DESTINATION:-$root/mlartifacts}
  args=(server --backend-store-uri "$backend" --artifacts-destination "$dest" --serve-artifacts
        --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-1}")
  if [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    export MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
    local ini="$root/basic_auth.ini"
    cat > "$ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$root/basic_auth.db}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH="$ini"
    if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then   # CSRF key of the auth app: kept across restarts
      [[ -s "$root/flask_secret_key" ]] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$root/flask_secret_key")
      MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$root/flask_secret_key"); export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    args+=(--app-name basic-auth)
  elif [[ "$host" != 127.0.0.1 && "$host" != localhost && "${MLFLOW_ALLOW_NO_AUTH:-0}" != 1 ]]; then
    echo "server.sh: refusing to serve on $host without auth: set MLFLOW_AUTH_ADMIN_PASSWORD (or MLFLOW_ALLOW_NO_AUTH=1)" >&2
    exit 2
  fi
  export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
}

healthy() { curl -fs --max-time 2 "$health_url" >/dev/null; }

case "$cmd" in
  run)
    server_args
    exec mlflow "${args[@]}" ;;
  start)
    server_args
    if [[ -f "$root/server.pid" ]] && kill -0 "$(cat "$root/server.pid")" 2>/dev/null; then
      echo "server.sh: already running (pid $(cat "$root/server.pid"), $root/server.pid)" >&2; exit 1
    fi
    setsid mlflow "${args[@]}" >"$root/server.log" 2>&1 </dev/null &
    echo $! >"$root/server.pid"
    for _ in $(seq 120); do
      if healthy; then echo "mlflow up on http://$host:$port (store ${args[2]}, artifacts ${args[4]})"; exit 0; fi
      kill -0 "$(cat "$root/server.pid")" 2>/dev/null || { echo "server.sh: mlflow exited; see $root/server.log" >&2; tail -5 "$root/server.log" >&2; exit 1; }
      sleep 0.5
    done
    echo "server.sh: mlflow did not answer $health_url in 60 s; see $root/server.log" >&2; exit 1 ;;
  stop)
    [[ -f "$root/server.pid" ]] || { echo "server.sh: no $root/server.pid" >&2; exit 1; }
    pid=$(cat "$root/server.pid")
    kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true   # setsid: the group id is the pid
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- -"$pid" 2>/dev/null || true
    rm -f "$root/server.pid"; echo "mlflow stopped" ;;
  health)
    healthy ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
