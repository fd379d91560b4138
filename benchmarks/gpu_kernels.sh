#!/usr/bin/env bash
# GPU kernel checks, then the kernel benchmark (DESIGN §5), on a CUDA machine.
#   OUT=results_dir bash benchmarks/gpu_kernels.sh
# Writes env.txt, gpu_tests_{skut,nn}.log, wgmma_check.log, bench.log, bench_detail.log,
# kernels_table.md and kernels_results.json under $OUT (default ./bench_out).
# Exit status: non-zero if a GPU test failed (the benchmark runs either way).
# SKIP_TESTS=1 / SKIP_BENCH=1 skip a phase; BENCH_ONLY=transformer|nn runs half the benchmark.
source "$(dirname "$0")/gpu_env.sh"
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
  # One pytest process per kernel: a device fault poisons its CUDA context, and with it every later
  # test of the same worker, so keep the two kernels' tests apart. Each test's result goes to the log as it
  # finishes (-v), so a run stopped by a time limit still names what passed; the terminal gets the summary.
  for part in skut nn; do
    t0=$(date +%s)
    select=$([ "$part" = skut ] && echo skut || echo "nn_ or tokens")  # nn: the selection's and the tokens' tests
    $PY -m pytest -m gpu tests/gpu/test_kernels_gpu.py -v -p no:cacheprovider -n "${PYTEST_WORKERS:-8}" \
      -k "$select" > "$OUT/gpu_tests_$part.log" 2>&1
    rc=$?
    grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests_$part.log" | tail -20
    [ "$rc" -ne 0 ] && status=$rc
    echo "gpu tests ($part): exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu_tests_$part.log"
  done

  # Why the kernels compile with DISABLE_MMA_V3 (see runtime/kernels/__init__.py): the same cases
  # with Triton's wgmma path allowed, each in its own process.
  for case in "33 64 1 32 max_valid 64" "37 96 2 64 none 64" "37 96 2 64 none 32"; do
    TRANSACT_KERNELS_WGMMA=1 timeout 120 $PY - $case <<'PYEOF' 2>&1 | tail -1 | tee -a "$OUT/wgmma_check.log"
import sys, torch
from torch import nn
from runtime.kernels import skut as sk
s, d, h, f, pool, bm = sys.argv[1:]
s, d, h, f, bm = int(s), int(d), int(h), int(f), int(bm)
pool = None if pool == "none" else pool
torch.manual_seed(0)
enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, h, f, 0.0, batch_first=True), 2,
                            enable_nested_tensor=False).eval().cuda()
x = torch.randn(4, s, d, device="cuda")
m = torch.rand(4, s, device="cuda") < 0.25
m[:, 0] = False
cfg = sk.SkutConfig(bm, 64 if bm == 64 else 32, 4, 32)
try:
    y = sk.skut_forward(x.half(), sk.pack_encoder_weights(enc, torch.float16), m, True, pool, config=cfg)
    r = sk.skut_reference(enc, x, m, True, pool)
    err = ((y.double() - r).norm() / r.norm()).item()
except Exception as exc:
    err = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
print(f"wgmma allowed, S={s} d={d} heads={h} ffn={f} pool={pool} block_m={bm}: relative error {err}")
PYEOF
  done
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  t0=$(date +%s)
  $PY benchmarks/kernels.py --out "$OUT" ${BENCH_ONLY:+--only "$BENCH_ONLY"} 2>&1 | tee "$OUT/bench.log"
  echo "benchmark: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/bench.log"
fi
exit "$status"
