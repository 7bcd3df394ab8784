#!/usr/bin/env bash
# N processes of dfer_clip_jax on this machine, each with K fake CPU devices: a multi-host run
# (jax.distributed, gloo collectives over 127.0.0.1) for testing and debugging without a cluster.
#
#   launch/local.sh -n 2 -d 4 -- --config=configs/demo.py --workdir=runs/demo_2proc
#   launch/local.sh --dry-run -n 2 -d 4 -- --config=configs/demo.py --workdir=runs/demo_2proc
#
# Every process runs `$PYTHON -m dfer_clip_jax.main ARGS...` (the same arguments) with
# JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=K and
# DFER_COORDINATOR_ADDRESS / DFER_NUM_PROCESSES / DFER_PROCESS_ID (read by
# dfer_clip_jax.distributed); with -n 1 it is a plain single process. Process i writes
# LOGDIR/process_i.log. The script waits for all of them; when one fails it stops the others
# and exits with that process's status (124 when --timeout expires).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [--] [ARGS for dfer_clip_jax.main...]

Options:
  -n, --num-processes N        processes to start (default 2)
  -d, --devices-per-process K  fake CPU devices per process (default 4)
  --logdir DIR                 where process_<i>.log go (default: a new folder under /tmp)
  --port PORT                  coordinator port on 127.0.0.1 (default: a free one)
  --module NAME                Python module to run (default dfer_clip_jax.main)
  --timeout SECONDS            stop every process after this long, exit 124 (default: none)
  --dry-run                    print the commands and exit
  -h, --help                   this text
Environment:
  PYTHON  the interpreter (default: .venv/bin/python of the repository if present, else python3)
EOF
}

die() {
  echo "local.sh: error: $*" >&2
  exit 2
}

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NUM=2
DEVICES=4
LOGDIR=""
PORT=""
MODULE="dfer_clip_jax.main"
TIMEOUT=0
DRY_RUN=0
while (($#)); do
  case "$1" in
    -n|--num-processes) [[ $# -ge 2 ]] || die "$1 needs a value"; NUM="$2"; shift 2 ;;
    -d|--devices-per-process) [[ $# -ge 2 ]] || die "$1 needs a value"; DEVICES="$2"; shift 2 ;;
    --logdir) [[ $# -ge 2 ]] || die "$1 needs a value"; LOGDIR="$2"; shift 2 ;;
    --port) [[ $# -ge 2 ]] || die "$1 needs a value"; PORT="$2"; shift 2 ;;
    --module) [[ $# -ge 2 ]] || die "$1 needs a value"; MODULE="$2"; shift 2 ;;
    --timeout) [[ $# -ge 2 ]] || die "$1 needs a value"; TIMEOUT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
ARGS=("$@")
cmd=()

is_count "$NUM" || die "--num-processes must be a positive integer, got '$NUM'"
is_count "$DEVICES" || die "--devices-per-process must be a positive integer, got '$DEVICES'"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds, got '$TIMEOUT'"
[[ -z "$PORT" || "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "Python interpreter '$PYTHON' not found (set PYTHON)"
if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    || die "could not find a free port with $PYTHON"
fi
if [[ -z "$LOGDIR" ]]; then
  LOGDIR="${TMPDIR:-/tmp}/dfer_local_$(date +%Y%m%d_%H%M%S)_$$"
fi

# Our device count wins over one already in XLA_FLAGS; other XLA flags are kept.
xla_flags="--xla_force_host_platform_device_count=$DEVICES"
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+=" $flag"
done

# The command of process $1, into the array `cmd`.
build_cmd() {
  cmd=(env)
  if ((NUM == 1)); then  # a plain single process, whatever the caller's environment says
    cmd+=(-u DFER_COORDINATOR_ADDRESS -u DFER_NUM_PROCESSES -u DFER_PROCESS_ID)
  fi
  cmd+=(JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}")
  if ((NUM > 1)); then
    cmd+=("DFER_COORDINATOR_ADDRESS=127.0.0.1:$PORT" "DFER_NUM_PROCESSES=$NUM" "DFER_PROCESS_ID=$1")
  fi
  cmd+=("$PYTHON" -m "$MODULE" ${ARGS[@]+"${ARGS[@]}"})
}

echo "local.sh: $NUM process(es) x $DEVICES CPU device(s), coordinator 127.0.0.1:$PORT, logs in $LOGDIR"
for ((i = 0; i < NUM; i++)); do
  build_cmd "$i"
  echo "  [$i] $(printf '%q ' "${cmd[@]}")> $LOGDIR/process_$i.log 2>&1"
done
if ((DRY_RUN)); then
  exit 0
fi
mkdir -p "$LOGDIR"

# Job control: every process gets its own process group, so stopping it also stops its children
# (e.g. input worker processes).
set -m
pids=()
stop_all() {
  local pid alive=0
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      alive=1
    fi
  done
  ((alive)) || return 0
  for _ in $(seq 1 50); do  # 10 s to exit cleanly, then SIGKILL
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'stop_all' EXIT
trap 'echo "local.sh: interrupted, stopping all processes" >&2; stop_all; exit 130' INT
trap 'echo "local.sh: terminated, stopping all processes" >&2; stop_all; exit 143' TERM

for ((i = 0; i < NUM; i++)); do
  build_cmd "$i"
  "${cmd[@]}" >"$LOGDIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
set +m  # groups are made; without job control bash does not print "Terminated" job notices
echo "${pids[*]}" >"$LOGDIR/pids"
echo "local.sh: started pids ${pids[*]}; follow with: tail -f $LOGDIR/process_0.log"

declare -a exit_codes=()
preempted=0
remaining=$NUM
start=$SECONDS
while ((remaining > 0)); do
  for ((i = 0; i < NUM; i++)); do
    [[ -n "${exit_codes[$i]:-}" ]] && continue
    pid="${pids[$i]}"
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    exit_codes[$i]=$rc
    remaining=$((remaining - 1))
    if ((rc == 42)); then
      # Preempted after the checkpoint every process agreed on: the others stop by themselves.
      echo "local.sh: process $i stopped for preemption after saving a checkpoint"
      preempted=1
      continue
    fi
    if ((rc != 0)); then
      echo "local.sh: process $i (pid $pid) failed with exit status $rc; stopping the others." >&2
      echo "---- last lines of $LOGDIR/process_$i.log ----" >&2
      tail -n 40 "$LOGDIR/process_$i.log" >&2 || true
      stop_all
      exit "$rc"
    fi
    echo "local.sh: process $i finished"
  done
  if ((TIMEOUT > 0 && SECONDS - start >= TIMEOUT)); then
    echo "local.sh: --timeout $TIMEOUT s expired; stopping all processes (logs in $LOGDIR)" >&2
    stop_all
    exit 124
  fi
  ((remaining > 0)) && sleep 0.5
done
if ((preempted)); then
  echo "local.sh: preempted; run the same command again to resume (logs in $LOGDIR)"
  exit 42
fi
echo "local.sh: all $NUM process(es) finished; logs in $LOGDIR"
