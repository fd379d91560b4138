# Sourced by the gpu_*.sh scripts: the repository root as working folder, the output folder $OUT
# (default ./bench_out), the project on PYTHONPATH, a Triton cache, and $PY (default python3).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$(pwd)/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
PY=${PYTHON:-python3}
