#!/usr/bin/env bash
# Starts N processes of the Graph Challenge run on this machine, joined through
# jax.distributed (process 0 is the coordinator) and prints process 0's report.
# On several hosts, run the same command on each host instead, with
# --coordinator HOST0:PORT --num-processes N --process-id I (I = 0 on HOST0).
#
#   scripts/launch_local.sh N [challenge options...]
#   e.g. scripts/launch_local.sh 2 --neurons 1024 --layers 120
#
# On a CPU-only machine each process gets JAX_NUM_CPU_DEVICES devices (default 1).
set -euo pipefail
n=${1:?usage: launch_local.sh N [options]}
shift
port=${SPDNN_PORT:-$((20000 + RANDOM % 20000))}
export JAX_NUM_CPU_DEVICES=${JAX_NUM_CPU_DEVICES:-1}
logs=$(mktemp -d)
pids=()
for ((i = 0; i < n; i++)); do
  python -m jax_spdnn challenge --distributed --coordinator "127.0.0.1:$port" \
    --num-processes "$n" --process-id "$i" "$@" >"$logs/$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=$?; echo "process $i failed:"; tail -20 "$logs/$i.log"; }
done
cat "$logs/0.log"
exit $status
