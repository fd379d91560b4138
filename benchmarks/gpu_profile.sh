#!/usr/bin/env bash
# Nsight Compute profiles of the kernels at the benchmark shapes, on a CUDA machine with `ncu`.
#   OUT=results_dir bash benchmarks/gpu_profile.sh [WORKLOAD ...]   (default: all of profile_kernels.py's)
# For each workload: one plain run to compile, then `ncu --set full` on one call's kernels (clocks left
# alone), written as WORKLOAD.ncu-rep plus two text exports: WORKLOAD_details.txt (every section:
# occupancy, registers, stall reasons, memory) and WORKLOAD_source.csv (per SASS instruction: samples
# by stall reason, with the Python line each came from where the line table allows; summed per line
# by `python benchmarks/profile_lines.py OUT/WORKLOAD_source.csv`). All text exports also go into
# OUT/profiles.tgz.
source "$(dirname "$0")/gpu_env.sh"
NCU=${NCU:-ncu}
workloads=("$@")
[ ${#workloads[@]} -eq 0 ] && workloads=(skut_v2 skut_v2_b16 skut_v1 nn_1user nn_64users nn_64users_100k)

"$NCU" --version 2>&1 | tee "$OUT/ncu_version.txt"
for w in "${workloads[@]}"; do
  case "$w" in
    skut*) filter="regex:_skut_"; skip=2; count=1 ;;
    nn*) filter="regex:_nn_"; skip=4; count=2 ;;  # the two kernels (scan, refine) of the third call
    *) echo "unknown workload $w"; continue ;;
  esac
  $PY benchmarks/profile_kernels.py "$w" --launches 1 > "$OUT/${w}_config.txt" 2>&1
  t0=$(date +%s)
  timeout 300 "$NCU" --clock-control none --set full --import-source yes -k "$filter" \
    --launch-skip "$skip" --launch-count "$count" -f -o "$OUT/$w" \
    $PY benchmarks/profile_kernels.py "$w" --launches 4 > "$OUT/${w}_ncu.log" 2>&1
  echo "$w: ncu exit $? in $(( $(date +%s) - t0 )) s"
  "$NCU" --import "$OUT/$w.ncu-rep" --page details > "$OUT/${w}_details.txt" 2>&1
  "$NCU" --import "$OUT/$w.ncu-rep" --page source --csv --print-source sass,cuda \
    > "$OUT/${w}_source.csv" 2>&1 \
    || "$NCU" --import "$OUT/$w.ncu-rep" --page source --csv --print-source sass \
      > "$OUT/${w}_source.csv" 2>&1
done
# One archive of the text exports (the reports themselves are large), for copying back from a GPU machine.
tar czf "$OUT/profiles.tgz" -C "$OUT" --exclude='*.ncu-rep' --exclude='profiles.tgz' .
