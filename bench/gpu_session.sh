#!/usr/bin/env bash
# One whole GPU measurement for bench/RESULTS.md, sized for one lent-device call (under 10
# minutes): bf16 and rowwise fp8 first (the targets), then torchao's fp8 (the comparison),
# then bf16 again from the warm compile cache (a restart). Each run has its own time limit,
# so a slow compile costs that run only. Wheels carried in .whl/ are installed first.
#   bash bench/gpu_session.sh            # results in $OUT (or bench-out/): NAME.json, NAME.txt
#   BENCH_GPU_ARGS=--tiny bash bench/gpu_session.sh   # the same on the CPU (the tests run it)
set -u
out=${OUT:-bench-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site:.
fi
export TORCHINDUCTOR_CACHE_DIR=/tmp/fluxstream-inductor TRITON_CACHE_DIR=/tmp/fluxstream-triton
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error

measure() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m bench.gpu ${BENCH_GPU_ARGS:-} --repeats 2 --json "$out/$name.json" "$@" >"$out/$name.txt" 2>&1
  tail -n 25 "$out/$name.txt"
}

measure bf16 180
measure fp8 180 --quantize fp8
measure fp8-torchao 120 --quantize fp8-torchao
measure bf16-restart 90
