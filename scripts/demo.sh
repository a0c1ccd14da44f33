#!/usr/bin/env bash
# End-to-end demo (`make demo`): a local tracking server, a 2-rank torchrun
# training run that every rank logs to, a fork of it at step 30 with another
# learning rate, and the fork's lineage.
#
#   PLUTO_DEMO_PORT      server port (default 7300)
#   PLUTO_DEMO_DATA_DIR  server data dir (default ./.pluto-data)
#   PLUTO_DEMO_STEPS     training steps (default 60); the fork is at half of them
#   PLUTO_DEMO_KEEP=1    keep the server running at the end until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${VENV_BIN:-.venv/bin}
HOST=127.0.0.1
PORT=${PLUTO_DEMO_PORT:-7300}
DATA_DIR=${PLUTO_DEMO_DATA_DIR:-./.pluto-data}
STEPS=${PLUTO_DEMO_STEPS:-60}
FORK_STEP=$((STEPS / 2))
PROJECT=demo
URL="http://${HOST}:${PORT}"
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pluto-demo.XXXXXX")
SERVER_LOG="$WORK/server.log"
SERVER_PID=""

for tool in python pluto torchrun; do
    [[ -x "$BIN/$tool" ]] || { echo "demo: $BIN/$tool missing; run 'make venv'" >&2; exit 1; }
done

PATH="$(cd "$BIN" && pwd):$PATH"
export PATH
export OMP_NUM_THREADS=1
export PLUTO_URL="$URL"
export PLUTO_PROJECT="$PROJECT"
# gloo talks over loopback only
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
unset PLUTO_RUN_ID MLOP_RUN_ID

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "demo: server did not stop on SIGTERM; killing it" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
cleanup() {
    local rc=$?
    if [[ $rc -ne 0 && $rc -ne 130 && $rc -ne 143 && -s "$SERVER_LOG" ]]; then
        echo "demo: failed (exit $rc); last lines of the server log:" >&2
        tail -n 40 "$SERVER_LOG" >&2
    fi
    stop_server
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

health() {
    python - "$URL/api/v1/health" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

port_free() {
    python - "$HOST" "$PORT" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

# -- 1. the server ------------------------------------------------------------------
if ! port_free; then
    echo "demo: $HOST:$PORT is already in use; stop that process or set PLUTO_DEMO_PORT" >&2
    exit 1
fi
say "starting pluto server on $URL (data dir $DATA_DIR, log $SERVER_LOG)"
pluto server --host "$HOST" --port "$PORT" --data-dir "$DATA_DIR" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
    health && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "demo: the server exited during start-up; its log:" >&2
        cat "$SERVER_LOG" >&2
        SERVER_PID=""
        exit 1
    fi
    sleep 0.1
done
health || { echo "demo: server not healthy after 30s; log:" >&2; cat "$SERVER_LOG" >&2; exit 1; }
echo "server up (pid $SERVER_PID)"

# -- 2. the baseline run: 2 ranks, one shared run ---------------------------------------
train() {  # train LOGFILE ARGS...: torchrun with 2 ranks, output shown and kept
    local log=$1
    shift
    torchrun --standalone --nproc_per_node=2 examples/train.py "$@" 2>&1 | tee "$log"
}
ids_of() {  # "id display_id" that rank 0 printed, for the summary
    sed -n 's/.*\[pluto\] rank=0 .*run_id=\([^ ]*\) display_id=\([^ ]*\).*/\1 \2/p' "$1" | head -1
}

BASE_EXT="demo-$STAMP"
say "baseline: PLUTO_RUN_ID=$BASE_EXT, $STEPS steps on 2 ranks"
PLUTO_RUN_ID="$BASE_EXT" train "$WORK/base.out" \
    --project "$PROJECT" --name baseline --steps "$STEPS"

# -- 3. the fork: same seed, continues after step FORK_STEP with another lr ---------------
# A run reference may be the numeric id, the display id or the external id (PLUTO_RUN_ID).
FORK_EXT="demo-$STAMP-fork"
say "fork: PLUTO_RUN_ID=$FORK_EXT, from $BASE_EXT at step $FORK_STEP, lr 0.02"
PLUTO_RUN_ID="$FORK_EXT" train "$WORK/fork.out" \
    --project "$PROJECT" --name fork-lr0.02 --steps "$STEPS" \
    --fork-run-id "$BASE_EXT" --fork-step "$FORK_STEP" --lr 0.02
read -r BASE_ID BASE_DISPLAY _ <<<"$(ids_of "$WORK/base.out") ? ?"
read -r FORK_ID FORK_DISPLAY _ <<<"$(ids_of "$WORK/fork.out") ? ?"

# -- 4. lineage ---------------------------------------------------------------------------
say "lineage of the fork ($FORK_EXT)"
pluto lineage "$FORK_EXT" --project "$PROJECT"

say "the fork's stitched train/loss around the fork step (mean over ranks)"
python - "$FORK_EXT" "$PROJECT" "$FORK_STEP" <<'PY'
import sys
from pluto import query

run, project, fork_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = query.get_metrics(run, project=project, keys=["train/loss"], lineage=True,
                         aggregate="mean", step_min=fork_step - 2, step_max=fork_step + 3)
for row in rows["train/loss"]:
    print(f"  step {row.step:3d}  loss {row.value:.4f}  owned by run {row.run}")
PY

say "where to look"
cat <<EOF
  server      $URL   (this demo stops it on exit; restart it with:
              $BIN/pluto server --port $PORT --data-dir $DATA_DIR)
  data dir    $DATA_DIR
  runs        baseline $BASE_DISPLAY (id $BASE_ID, PLUTO_RUN_ID=$BASE_EXT)
              fork     $FORK_DISPLAY (id $FORK_ID, PLUTO_RUN_ID=$FORK_EXT), forked at step $FORK_STEP
  lineage     PLUTO_URL=$URL $BIN/pluto lineage $FORK_EXT --project $PROJECT
  query       PLUTO_URL=$URL $BIN/python
              >>> from pluto import query
              >>> query.get_metrics("$FORK_EXT", project="$PROJECT", keys=["train/loss"],
              ...                   lineage=True)   # stitched: steps 1..$FORK_STEP from the baseline
              >>> query.get_metrics("$BASE_EXT", project="$PROJECT", keys=["train/grad_norm"])
EOF

if [[ "${PLUTO_DEMO_KEEP:-0}" == "1" ]]; then
    say "server still running on $URL; Ctrl-C to stop it"
    wait "$SERVER_PID" || true
fi
