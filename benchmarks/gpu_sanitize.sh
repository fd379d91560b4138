#!/usr/bin/env bash
# NVIDIA compute-sanitizer over every Triton kernel of the runtime (benchmarks/sanitize_kernels.py: each code
# path launched on small inputs and checked against its reference), one tool at a time: memcheck
# (out-of-bounds and misaligned accesses), racecheck (shared-memory hazards), synccheck (barrier misuse),
# initcheck (reads of device memory never written). PyTorch's caching allocator is off, so every tensor is
# its own allocation and an access past its end is outside any allocation, which memcheck sees. Prints one
# line per tool; exit status 1 if a tool reported an error, a case failed or a tool ran out of time.
# On an H200 the first tool also compiles every kernel (memcheck: 21 of the 32 cases in 130 s); with Triton's
# cache warm, synccheck and initcheck take 10-30 s and racecheck a few minutes (23 cases in 130 s).
#
#   bash benchmarks/gpu_sanitize.sh                              # every tool, every case
#   TOOLS=memcheck CASES="skut" bash benchmarks/gpu_sanitize.sh   # one tool, the cases named *skut*
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
TOOLS=${TOOLS:-memcheck racecheck synccheck initcheck}
LIMIT=${LIMIT:-600}  # seconds per tool
status=0
for tool in $TOOLS; do
  log="$OUT/sanitize_$tool.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$LIMIT" compute-sanitizer --tool "$tool" --print-limit 50 \
    "$PY" benchmarks/sanitize_kernels.py ${CASES:-} >"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  # memcheck, synccheck and initcheck end with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY:
  # H hazards displayed (E errors, W warnings)"; a run cut short by the limit has no summary (rc 124): then the
  # reports it printed so far are counted ("========= Error: ..." / "========= Warning: ...", one per report).
  if grep -qE "ERROR SUMMARY|RACECHECK SUMMARY" "$log"; then
    errors=$( (grep -oE "ERROR SUMMARY: [0-9]+" "$log" | awk '{print $3}'
               grep -oE "hazards displayed \([0-9]+ errors, [0-9]+ warnings" "$log" | tr -d '(,' | awk '{print $3 + $5}') \
             | awk '{s += $1} END {print s + 0}')
  else
    errors=$(grep -cE "^========= +(Error|Warning): " "$log")
  fi
  cases=$(grep -cE ": ok \(" "$log")
  failed=$(grep -cE ": FAILED" "$log")
  echo "$tool: $errors errors; $cases cases ok, $failed failed (rc $rc, $secs s)"
  if [ "$errors" != 0 ] || [ "$rc" != 0 ]; then
    status=1
    [ "$rc" = 124 ] && echo "  out of time after: $(grep -E ": (ok|FAILED)" "$log" | tail -1)"
    grep -E "FAILED|^========= +(Invalid|Race|Barrier|Uninitialized|Error|Warning|Potential|at .*in )" "$log" | sort | uniq -c \
      | sort -rn | head -20
  fi
done
exit $status
