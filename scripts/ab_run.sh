#!/usr/bin/env bash
# One device session of A/B timing: build, then benchmarks/ab_env.py over AB_PROBLEM with
# AB_VAR in AB_VALUES, then (NCU_SKIP set) one footprint-kernel launch in Nsight Compute.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export CMAKE_ARGS=${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90}
scripts/gpu_check.sh build || exit 1
if [ -n "${AB_VAR:-}" ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 benchmarks/ab_env.py --problem ${AB_PROBLEM:-16384-120} \
    --chunk-layers ${AB_CHUNK:-0} --var "$AB_VAR" --values ${AB_VALUES} --rounds ${AB_ROUNDS:-1} \
    --calls ${AB_CALLS:-2} 2>&1 | tee "$OUT/ab.log" | grep -vi warning | tail -20
fi
if [ -n "${NCU_SKIP:-}" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --kernel-name-base ${NCU_NAME_BASE:-function} --kernel-name regex:"${NCU_KERNEL:-footprint_pipe}" \
    --launch-skip "$NCU_SKIP" --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section Occupancy --section LaunchStats \
    python3 benchmarks/profile_dnn.py --problem ${PROFILE_PROBLEM:-16384-40} --runs 1 --calls 0 \
    >"$OUT/ncu.txt" 2>&1
  grep -vE "^==PROF==|^run|^active|^    -----|^    Metric Name" "$OUT/ncu.txt" | grep -E "\S" | cut -c1-130 | head -${NCU_LINES:-150}
fi
if [ -n "${NCU_SOURCE_SKIP:-}" ]; then  # per-SASS-instruction counters of one launch
  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --kernel-name-base ${NCU_NAME_BASE:-function} --kernel-name regex:"${NCU_KERNEL:-footprint_pipe}" \
    --launch-skip "$NCU_SOURCE_SKIP" --launch-count 1 --section SourceCounters --section InstructionStats \
    --section WarpStateStats -o "$OUT/source" \
    python3 benchmarks/profile_dnn.py --problem ${PROFILE_PROBLEM:-16384-40} --runs 1 --calls 0 >"$OUT/ncu_source.log" 2>&1
  ncu -i "$OUT/source.ncu-rep" --page source --csv --print-source sass >"$OUT/sass.csv" 2>&1
  ncu -i "$OUT/source.ncu-rep" --page details >"$OUT/source_details.txt" 2>&1
  wc -l "$OUT/sass.csv"; head -3 "$OUT/sass.csv" | cut -c1-300
fi
