#!/usr/bin/env bash
# One whole GPU measurement for bench/RESULTS.md, sized for one lent-device call (under 10
# minutes). Runs, in the order named (default: all, most important first):
#   bf16          the targets, from a cold compile cache, and a profile of three steps
#   fp8           rowwise fp8, with its PSNR against bf16 for the same seed, and a profile
#   lora          bf16 with the compiled hot-swap slot, random LoRAs of rank 64 (#17)
#   embedded      the trained embedded model at its default size, on the GPU
#   fp8-torchao   torchao's float8, to compare with the rowwise layer
#   lora-fp8      fp8 with the slot, and fp8 + LoRA against bf16 + LoRA
#   bf16-restart  bf16 again from the warm compile cache, as a restart would
# Each run has its own time limit, cut to what is left of SESSION_S (default 570 s), so a
# slow compile costs that run only. Cold, bf16 took 146-170 s on an H200, fp8 and lora each
# more than 160 s, torchao's fp8 more than 240 s: one call holds about three runs, so name
# the ones still missing (bench/RESULTS.md lists them). Each run prints its stages as they
# end, so a run cut off by its limit still says how far it got. The
# compile cache lives in .compile-cache/ (ignored), which a device machine keeps between
# calls while it stays warm. Wheels carried in .whl/ are installed first.
#   bash bench/gpu_session.sh                   # results in $OUT (or bench-out/)
#   bash bench/gpu_session.sh bf16-restart      # a second call on the same machine
#   BENCH_GPU_ARGS=--tiny bash bench/gpu_session.sh bf16 lora   # on the CPU (the tests)
set -u
started=$SECONDS
session=${SESSION_S:-570}
out=${OUT:-bench-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site:.
fi
export TORCHINDUCTOR_CACHE_DIR=$PWD/.compile-cache/inductor TRITON_CACHE_DIR=$PWD/.compile-cache/triton
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
python3 -c 'import torch, diffusers, transformers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "peft", peft.__version__)
if torch.cuda.is_available(): print(torch.cuda.get_device_name())' | tee "$out/versions.txt"

measure() {
  local name=$1 limit=$2
  shift 2
  local left=$((session - (SECONDS - started)))
  if ((left < 30)); then
    echo "== $name: skipped, $left s left" | tee "$out/$name.txt"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit $limit s)"
  timeout "$limit" python3 -m bench.gpu ${BENCH_GPU_ARGS:-} --repeats 2 --json "$out/$name.json" "$@" \
    >"$out/$name.txt" 2>&1
  echo "exit $? after $((SECONDS - started)) s" >>"$out/$name.txt"
  tail -n 30 "$out/$name.txt"
}

run() {
  case $1 in
    bf16) measure bf16 200 --profile ;;
    fp8) measure fp8 240 --quantize fp8 --profile ;;
    lora) measure lora 220 --lora-rank 64 ;;
    embedded) measure embedded 150 --model embedded --size 256 --steps 8 ;;
    fp8-torchao) measure fp8-torchao 480 --quantize fp8-torchao --profile ;;
    lora-fp8) measure lora-fp8 240 --lora-rank 64 --quantize fp8 ;;
    bf16-restart) measure bf16-restart 90 ;;
    *) echo "unknown run: $1" >&2 ;;
  esac
}

if (($# == 0)); then
  set -- bf16 fp8 lora embedded fp8-torchao lora-fp8 bf16-restart
fi
for name in "$@"; do
  run "$name"
done
