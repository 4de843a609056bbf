#!/usr/bin/env bash
# Runs one command as N JAX processes on this machine (CPU, gloo collectives), each
# with K simulated devices: a multi-host run in miniature, for tests and debugging.
#
#   launch/local_multiprocess.sh [FLAGS] -- COMMAND [ARGS...]
#   launch/local_multiprocess.sh -n 2 -k 2 -- \
#       python -m jalign.train --config=configs/quickstart.py:sft,test --workdir=/tmp/mp
#
# Flags:
#   -n, --num_processes=N        processes to start (default 2)
#   -k, --devices_per_process=K  CPU devices per process (default 1)
#   --port=P                     coordinator port on 127.0.0.1 (default: a free port)
#   --log_dir=DIR                also write process_I.log files there (default: none)
#   --timeout=SECONDS            stop every process after this long, exit 124 (default 0: none)
#   --dry-run                    print the commands (with their environment) and exit
#   -h, --help                   this text
#
# Every process gets the same COMMAND with JAX_PLATFORMS=cpu,
# XLA_FLAGS=--xla_force_host_platform_device_count=K and JALIGN_COORDINATOR,
# JALIGN_NUM_PROCESSES, JALIGN_PROCESS_ID, which jalign.distributed.initialize reads.
# Output lines are prefixed with [I]. Exits 0 when all processes succeed; when one
# fails, the others are stopped and the script exits with the first failure's status.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }

num_processes=2
devices=1
port=""
log_dir=""
timeout_s=0
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) num_processes="${2:?-n needs a value}"; shift 2 ;;
    --num_processes=*) num_processes="${1#*=}"; shift ;;
    -k) devices="${2:?-k needs a value}"; shift 2 ;;
    --devices_per_process=*) devices="${1#*=}"; shift ;;
    --port=*) port="${1#*=}"; shift ;;
    --log_dir=*) log_dir="${1#*=}"; shift ;;
    --timeout=*) timeout_s="${1#*=}"; shift ;;
    --dry-run|--dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown flag '$1' (the command goes after --; see --help)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given: launch/local_multiprocess.sh [FLAGS] -- COMMAND"
for value in "$num_processes" "$devices" "$timeout_s"; do
  [[ "$value" =~ ^[0-9]+$ ]] || die "'$value' is not a non-negative integer"
done
[[ "$num_processes" -ge 1 && "$devices" -ge 1 ]] || die "need -n >= 1 and -k >= 1"
command -v "$1" >/dev/null 2>&1 || die "'$1' (the command) is not on PATH"
for tool in sed tee; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but not installed"
done
if [[ -z "$port" ]]; then
  command -v python3 >/dev/null 2>&1 || die "python3 is required to pick a free port (or pass --port)"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

# Drop any device-count flag already in XLA_FLAGS: K is this script's to set.
xla_flags="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/^ +//; s/ +$//')"
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"

env_for() {  # the environment of process $1, one NAME=value per line
  printf '%s\n' "JAX_PLATFORMS=cpu" "XLA_FLAGS=$xla_flags" \
    "JALIGN_COORDINATOR=127.0.0.1:$port" "JALIGN_NUM_PROCESSES=$num_processes" \
    "JALIGN_PROCESS_ID=$1"
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    mapfile -t vars < <(env_for "$i")
    printf 'env'; printf ' %q' "${vars[@]}" "$@"; printf ' &\n'
  done
  echo "wait  # $num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$port"
  exit 0
fi

[[ -z "$log_dir" ]] || mkdir -p "$log_dir"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  mapfile -t vars < <(env_for "$i")
  log="/dev/null"
  [[ -z "$log_dir" ]] || log="$log_dir/process_$i.log"
  env "${vars[@]}" "$@" > >(tee "$log" | sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

status=0
started=$SECONDS
remaining=$num_processes
declare -A done_pids=()
while [[ $remaining -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ -z "${done_pids[$pid]:-}" ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" || rc=$?
    done_pids[$pid]=1
    remaining=$((remaining - 1))
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      echo "local_multiprocess.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  if [[ $remaining -gt 0 && "$timeout_s" -gt 0 && $((SECONDS - started)) -ge "$timeout_s" ]]; then
    echo "local_multiprocess.sh: timed out after ${timeout_s}s; stopping every process" >&2
    stop_all
    status=124
  fi
  [[ $remaining -eq 0 ]] || sleep 0.2
done
wait  # the output filters flush after their process exits
exit "$status"
