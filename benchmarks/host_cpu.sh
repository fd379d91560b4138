#!/usr/bin/env bash
# The cpu backend on a GPU machine's host CPU (DESIGN §5 measures on that machine): how its chunks slow each other
# down side by side (cpu_scaling.py: per operator, and a compute and a streaming probe), then the DESIGN §5 request
# against eager PyTorch at 1, 2, 4, 8 threads and every usable CPU, where the host has them (cpu_backend.py, one table),
# where the request's time goes at those counts (cpu_timeline.py), requests per second with every core busy
# (cpu_throughput.py), and with other chunk sizes.
#   OUT=results_dir bash benchmarks/host_cpu.sh
source "$(dirname "$0")/gpu_env.sh"
BUNDLE=${BUNDLE:-/tmp/transact-default-bundle}
status=0
[ -f "$BUNDLE/manifest.json" ] || $PY -c "import sys; from pathlib import Path; from runtime.bench import random_bundle; \
random_bundle(Path(sys.argv[1]))" "$BUNDLE" || exit 1
{ lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node|L2|L3)"; \
  $PY -c "import torch, onnxruntime, numpy; print('torch', torch.__version__, 'onnxruntime', onnxruntime.__version__, \
'numpy', numpy.__version__)"; } | tee "$OUT/host_cpu.txt"
timeout "${SCALING_TIMEOUT:-300}" $PY benchmarks/cpu_scaling.py --bundle "$BUNDLE" --json "$OUT/cpu_scaling.json" \
  2>&1 | tee "$OUT/cpu_scaling.log"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc
# The same with each chunk's thread pinned to its own CPU (the backend leaves placement to the OS), and with a
# session per chunk (the backend's layout before 2026-12-05).
for variant in pin separate-sessions; do
  timeout "${SCALING_TIMEOUT:-300}" $PY benchmarks/cpu_scaling.py --bundle "$BUNDLE" --"$variant" --no-profile \
    --json "$OUT/cpu_scaling_$variant.json" 2>&1 | tee "$OUT/cpu_scaling_$variant.log"
  rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc
done
cpus=$(nproc)
counts=$(printf '%s\n' 1 2 4 8 "$cpus" | awk -v n="$cpus" '$1 <= n && !seen[$1]++' | paste -sd, -)
ncounts=$(( $(tr -cd , <<< "$counts" | wc -c) + 1 ))
timeout $(( ${BENCH_TIMEOUT:-300} * ncounts )) $PY benchmarks/cpu_backend.py --bundle "$BUNDLE" --threads "$counts" \
  --runs 20 --json "$OUT/cpu_backend_sweep.json" 2>&1 | tee "$OUT/cpu_backend_sweep.log"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc
# Where one request's time goes at each count: before the chunks, the chunk phase and its idle slots, after them.
timeout $(( ${BENCH_TIMEOUT:-300} * ncounts )) $PY benchmarks/cpu_timeline.py --bundle "$BUNDLE" --threads "$counts" \
  --runs 20 --json "$OUT/cpu_timeline.json" 2>&1 | tee "$OUT/cpu_timeline.log"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc
# Requests per second with every core busy: one worker process per CPU, one thread each.
timeout "${BENCH_TIMEOUT:-300}" $PY benchmarks/cpu_throughput.py --bundle "$BUNDLE" --json "$OUT/cpu_throughput.json" \
  2>&1 | tee "$OUT/cpu_throughput.log"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc
# Other chunk sizes: halved at every CPU (twice the chunks, so the request and dense stages run), doubled at 2 threads
# (at many threads a request of 256 has no larger chunks: the chunk count is rounded up to the slots).
for run in "$cpus 8" "2 32"; do
  set -- $run
  [ "$1" -le "$cpus" ] || continue
  timeout "${BENCH_TIMEOUT:-300}" $PY benchmarks/cpu_backend.py --bundle "$BUNDLE" --threads "$1" --max-chunk "$2" \
    --runs 20 --json "$OUT/cpu_backend_${1}_chunk$2.json" 2>&1 | tee "$OUT/cpu_backend_${1}_chunk$2.log"
  rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc
done
exit "$status"
