#!/usr/bin/env bash
# `transact parity` with the hybrid GPU runtime on a CUDA machine: a model exported to a bundle, then
# eager PyTorch vs ONNX Runtime vs the hybrid runtime over the edge cases and random inputs.
#   OUT=results_dir bash benchmarks/gpu_parity.sh [small|default]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(pwd)/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
BUNDLE=/tmp/transact-parity-bundle
$PY - "$BUNDLE" "${1:-small}" <<'PYEOF'
import sys
from pathlib import Path
from runtime.bench import random_bundle
from transact.config import ModelConfig, TransActConfig, TransActV2Config
cfg = ModelConfig() if sys.argv[2] == "default" else ModelConfig(
    max_ll=2000, transact=TransActConfig(seq_len=32, latest_n_emb=4),
    transact_v2=TransActV2Config(k_ll=32, r_rt=16, k_rt=16, k_imp=16))
random_bundle(Path(sys.argv[1]), cfg)
PYEOF
$PY -m transact.cli parity "$BUNDLE" --hybrid on --cases 2 --json > "$OUT/parity_hybrid.json"
rc=$?
$PY - "$OUT/parity_hybrid.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
for c in r["comparisons"]:
    p = c["outputs"]["probabilities"]
    print(f"{c['backend']:<20} {str(c['settings'])[:60]:<60} max abs {p['max_abs']:.2e} bad {p['out_of_tolerance']} "
          f"selection {c.get('selection')} {'ok' if c['passed'] else 'FAIL ' + '; '.join(c['failures'])}")
print("passed:", r["passed"])
PYEOF
echo "parity exit $rc"
exit $rc
