#!/usr/bin/env bash
# The hybrid runtime on a CUDA machine: its GPU tests and training on the GPU, then the end-to-end benchmark (DESIGN §5).
#   OUT=results_dir bash benchmarks/gpu_runtime.sh
source "$(dirname "$0")/gpu_env.sh"
BUNDLE=${BUNDLE:-/tmp/transact-default-bundle}
status=0
$PY -c "import torch, triton, onnxruntime, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'onnxruntime', onnxruntime.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
# The host: CPU model and NUMA layout (host-side stages differ by machine; see runtime.py's stage table).
{ lscpu 2>/dev/null | grep -E "^(Model name|NUMA node)"; nvidia-smi topo -m 2>/dev/null | head -3; } | tee -a "$OUT/env.txt"
# One default-config bundle (random weights) for the tests and the benchmark.
$PY -c "import sys; from pathlib import Path; from runtime.bench import random_bundle; print('bundle', random_bundle(Path(sys.argv[1])))" "$BUNDLE"
t0=$(date +%s)
TRANSACT_TEST_BUNDLE=$BUNDLE timeout "${TEST_TIMEOUT:-600}" $PY -m pytest -m gpu tests/gpu/test_runtime_gpu.py tests/gpu/test_train_gpu.py -q -x \
  -p no:cacheprovider 2>&1 | tee "$OUT/runtime_gpu_tests.log"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=$rc
echo "runtime gpu tests: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/runtime_gpu_tests.log"
timeout "${BENCH_TIMEOUT:-900}" $PY benchmarks/runtime.py --bundle "$BUNDLE" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/runtime_bench.log"
exit "$status"
