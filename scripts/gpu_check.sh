#!/usr/bin/env bash
# Build, test and benchmark on a machine with a CUDA GPU and no network access.
# Logs go to $OUT (default ./out).  Wheels of missing pure-Python test
# dependencies may be provided in .whl/ (installed only when missing).
#
#   scripts/gpu_check.sh [build] [test] [bench] [dnn] [stream] [conv] [sharded] [tune] [tails] [profile]
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
steps=${*:-build test bench}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv;
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"; } \
  2>&1 | tee "$OUT/env.txt"

if [ -d .whl ]; then
  wheels=()
  $PY -c "import hypothesis" 2>/dev/null || wheels+=(.whl/hypothesis-* .whl/sortedcontainers-*)
  $PY -c "import rich" 2>/dev/null || wheels+=(.whl/rich-* .whl/markdown_it_py-* .whl/mdurl-* .whl/pygments-*)
  $PY -c "import sklearn" 2>/dev/null || wheels+=(.whl/scikit_learn-* .whl/joblib-* .whl/threadpoolctl-*)
  if [ ${#wheels[@]} -gt 0 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

if [[ " $steps " == *" build "* ]]; then
  echo "== build"
  SPDNN_CUDA=ON $PY -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  grep -E "registers|spill" "$OUT/build.log" | sort -u | head -40 > "$OUT/ptxas.txt" || true
  $PY -c "import jax_spdnn as sd; print(sd._native.cuda_status())" | tee -a "$OUT/env.txt"
fi

if [[ " $steps " == *" test "* ]]; then
  echo "== test"
  $PY -m pytest -q -x -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -15
fi

if [[ " $steps " == *" bench "* ]]; then
  echo "== bench"
  $PY benchmarks/bench_linear.py --json "$OUT/bench_linear.json" 2>&1 | tee "$OUT/bench_linear.log" | tail -20
fi

if [[ " $steps " == *" dnn "* ]]; then
  echo "== whole-network benchmark"
  $PY benchmarks/bench_dnn.py --problems ${DNN_PROBLEMS:-1024-120 4096-120} ${DNN_ARGS:---dtypes float32 bfloat16} \
    --json "$OUT/bench_dnn.json" 2>&1 | tee "$OUT/bench_dnn.log" | tail -${DNN_TAIL:-12}
fi

if [[ " $steps " == *" stream "* ]]; then
  echo "== streamed networks (chunks of layers made on the device)"
  # 60000 x 65536 float32 features: input, output and the kernel's two work buffers.
  XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.92} $PY benchmarks/bench_dnn.py --problems ${STREAM_PROBLEMS:-65536-120} --chunk-layers ${CHUNK_LAYERS:-120} \
    ${STREAM_ARGS:---no-check} --json "$OUT/bench_stream.json" 2>&1 | tee "$OUT/bench_stream.log" | tail -6
fi

if [[ " $steps " == *" conv "* ]]; then
  echo "== pruned conv layers"
  $PY benchmarks/bench_conv.py ${CONV_ARGS:-} ${CONV_LAYERS:+--layers "$CONV_LAYERS"} --json "$OUT/bench_conv.json" 2>&1 \
    | tee "$OUT/bench_conv.log" | cut -c1-220 | tail -${CONV_TAIL:-20}
fi

if [[ " $steps " == *" sharded "* ]]; then
  echo "== sharded scaling (all visible devices)"
  $PY benchmarks/bench_sharded.py --problems ${SHARDED_PROBLEMS:-16384-120 65536-120} \
    --rebalance ${SHARDED_REBALANCE:-10} ${SHARDED_ARGS:-} --json "$OUT/bench_sharded.json" 2>&1 \
    | tee "$OUT/bench_sharded.log" | tail -20
fi

if [[ " $steps " == *" tune "* ]]; then
  echo "== tune (output-group width)"
  for outs in 1 2 4; do
    SPDNN_LINEAR_OUTS=$outs $PY benchmarks/bench_linear.py --ours-only 2>&1 | grep "^| [0-9]" | tee -a "$OUT/tune.log"
  done
fi

if [[ " $steps " == *" tails "* ]]; then
  echo "== A/B of whole-network settings in one process (benchmarks/profile_dnn.py --tails)"
  $PY benchmarks/profile_dnn.py --problem ${TAILS_PROBLEM:-1024-120} --calls ${TAILS_CALLS:-30} \
    --rounds ${TAILS_ROUNDS:-2} ${TAILS_ARGS:---dispatch} --tails ${TAILS:-default off} 2>&1 \
    | tee "$OUT/tails.log" | grep -E "dispatch|per call|Error|error" | cut -c1-400
fi

if [[ " $steps " == *" profile "* ]]; then
  echo "== profile (per-launch kernel durations of SparseDNN runs)"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  for kernel in ${PROFILE_KERNELS:-auto}; do
    SPDNN_DNN_KERNEL=$kernel ncu --clock-control none ${NCU_FLAGS:-} --metrics gpu__time_duration.sum --csv --page raw \
      $PY benchmarks/profile_dnn.py --problem ${PROFILE_PROBLEM:-1024-120} --runs 1 --calls 0 \
      >"$OUT/profile_$kernel.csv" 2>"$OUT/profile_$kernel.err"
    echo "-- $kernel kernel: per-launch durations (kernel name, us)"
    grep -E "^active" "$OUT/profile_$kernel.csv" | cut -c1-400
    $PY - "$OUT/profile_$kernel.csv" <<'PYEOF'
import csv, sys
rows = list(csv.reader(l for l in open(sys.argv[1]) if l.startswith('"')))
head = rows[0]
ki, vi = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
out = []
for r in rows[2:]:
    name = r[ki]
    for key in ("resident", "fused_layer", "footprint_layer", "footprint_pipe", "stationary", "compact_rows", "mark_nonzero", "interleave", "list_nonzero", "scatter", "gather_fusion", "reduce_fusion"):
        if key in name:
            out.append(f"{key}:{float(r[vi].replace(',', '')) / 1000:.0f}")
print(" ".join(out))
PYEOF
  done
  for skip in ${NCU_SKIP:-}; do  # launches of NCU_KERNEL in detail
    ncu --clock-control none --kernel-name regex:"$NCU_KERNEL" --launch-skip $skip --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      $PY benchmarks/profile_dnn.py --problem ${PROFILE_PROBLEM:-1024-120} --runs 1 --calls 0 >"$OUT/ncu_detail_$skip.txt" 2>&1
    echo "-- $NCU_KERNEL launch $skip"
    grep -vE "^==PROF==|^run|^active|^10 calls|^    -----|^    Section:|^    Metric Name" "$OUT/ncu_detail_$skip.txt" | grep -E "\S" | cut -c1-120 | head -${NCU_LINES:-110}
  done
  SPDNN_HOST_TIMING=1 $PY benchmarks/profile_dnn.py --problem ${PROFILE_PROBLEM:-1024-120} --runs 3 2>&1 | grep -E "^run|calls|enqueued" | tail -8
fi
