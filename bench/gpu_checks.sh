#!/usr/bin/env bash
# The GPU checks this project owes, in one place, for a session that has a device (see README).
#   bash bench/gpu_checks.sh tests   # GPU tests of the kernels, the extension and the model at full sizes
#   bash bench/gpu_checks.sh bench   # DESIGN §11 benchmarks -> bench/results/*-<gpu>.json
# Each stage fits in one 10-minute device call. Logs and JSON are copied to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/acelora-gpu}
mkdir -p "$OUT"
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
export TRITON_INTERPRET=0  # real kernels; interpreter-only cases skip or run on CUDA tensors

case "${1:-tests}" in
  tests)
    python3 -m pytest -q -x tests/kernels tests/ops tests/nn tests/models tests/test_compile_friendly.py \
      2>&1 | tee "$OUT/gpu-tests.log" | tail -30
    ;;
  bench)
    {
      python3 bench/bench_lora_qkv.py
      python3 bench/bench_hgnn.py
      python3 bench/bench_infonce.py
      python3 -m acelora bench --model biomedclip --batch 64 256 --device cuda --steps 30 --warmup 5
      python3 bench/bench_zeroshot.py --model biomedclip --device cuda
    } 2>&1 | tee "$OUT/gpu-bench.log" | grep -v "^WARNING"
    tar czf "$OUT/results.tgz" bench/results
    ;;
  *) echo "usage: $0 tests|bench" >&2; exit 2 ;;
esac
