#!/usr/bin/env bash
# Submit a stage with `ray job submit` to a separate local Ray head on 127.0.0.1, exactly as one
# submits to a cluster (the automated version is tests/test_job_submit.py). Run from anywhere:
#
#   cluster/local_job_submit.sh [COPY_TO] [-- ENTRYPOINT...]
#
# Default entrypoint: prepare on a tiny synthetic world with the relative `output_root=runs`, which
# a submitted job resolves against ITS working directory (the project as uploaded by --working-dir,
# unpacked on the head); the run is copied from there to COPY_TO (default: a new temp dir) before
# the head, and its temp dir, go away. On a real cluster use a shared or s3:// output_root instead.
#
# The head gets its own --temp-dir and free ports, and only ITS processes are stopped at the end
# (its process group): never `ray stop` on a shared machine, it stops every Ray on the host.
set -euo pipefail  # pipefail: `ray job submit | tee` fails when the job does
cd "$(dirname "$0")/.."
VENV_BIN="$(pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH" RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
unset RAY_ADDRESS
# Token auth with a token of this head's own (in the environment of the head, its workers and the
# submitting CLI), whatever ~/.ray/auth_token holds: Ray turns token auth on for a head when that
# file exists, but `ray job submit` with RAY_AUTH_MODE unset sends no token.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(python -c 'import uuid; print(uuid.uuid4().hex)')"
# On a loaded machine the dashboard agent can take longer to come up than the raylet's default wait.
export RAY_agent_register_timeout_ms=120000

OUT="${1:-$(mktemp -d /tmp/rrjob-out.XXXXXX)}"
[ "$#" -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
if [ "$#" -eq 0 ]; then
  set -- python -m ray_jobs.prepare --config configs/quickstart.yaml output_root=runs run_name=jobtest \
    data.sources.0.synthetic.n_users=60 data.sources.0.synthetic.n_items=30 \
    data.direct_negatives=5 ray.shuffle_partitions=2
fi

TMP="$(mktemp -d /tmp/rrj.XXXXXX)"      # short: Ray's socket paths must stay < 108 bytes
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Every port the head binds, free ones: Ray's fixed defaults (dashboard agent 52365, client server
# 10001, ...) are taken whenever another Ray runs here, and a dashboard agent that cannot bind its
# port leaves the job API answering "No available agent".
PORT_ARGS=()
for flag in --port --dashboard-port --ray-client-server-port --dashboard-agent-listen-port \
            --dashboard-agent-grpc-port --runtime-env-agent-port --metrics-export-port \
            --node-manager-port --object-manager-port; do
  port=$(free_port)
  PORT_ARGS+=("$flag=$port")
  [ "$flag" = --dashboard-port ] && DASH_PORT=$port
done

HEAD_PGID=""
cleanup() {
  if [ -n "$HEAD_PGID" ]; then
    kill -TERM -- "-$HEAD_PGID" 2>/dev/null || true
    for _ in $(seq 20); do
      ps -o pid= -g "$HEAD_PGID" >/dev/null 2>&1 || break
      sleep 0.5
    done
    kill -KILL -- "-$HEAD_PGID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

# setsid: the head and everything it starts share a new process group, stopped in cleanup().
setsid ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --include-dashboard=true \
  "${PORT_ARGS[@]}" --num-cpus=2 --temp-dir="$TMP" --disable-usage-stats &
HEAD_PGID=$!
wait "$HEAD_PGID"

# `ray start` returns before the head's dashboard agent has registered; until then the job API
# answers "No available agent" (after waiting 10 s server-side). Only that answer is retried.
for attempt in $(seq 12); do
  rc=0
  ray job submit --address "http://127.0.0.1:$DASH_PORT" --working-dir . \
    --runtime-env-json '{"excludes": [".venv", "runs", ".git", "bench/results", "__pycache__", "*.egg-info", ".pytest_cache"], "env_vars": {"HF_HUB_OFFLINE": "1"}}' \
    -- "$@" 2>&1 | tee "$TMP/submit.log" || rc=$?
  [ "$rc" -eq 0 ] && break
  grep -q "No available agent to submit job" "$TMP/submit.log" || exit "$rc"
  echo "(job agent not registered yet; attempt $attempt)"
done
[ "$rc" -eq 0 ] || exit "$rc"

# A relative output_root wrote into the job's working directory under the head's temp dir.
mkdir -p "$OUT"
find "$TMP" -path "*/working_dir_files/*/runs/*/*/_manifest.json" -printf '%h\n' 2>/dev/null | xargs -r -n1 dirname \
  | sort -u | while read -r run_dir; do cp -r "$run_dir" "$OUT/"; done
echo "outputs under: $OUT"
ls "$OUT"/*/ 2>/dev/null || true
