#!/usr/bin/env bash
# The GPU measurements in two device calls (each <= 9 minutes on an H100/H200), most important
# first, each step with its own time limit so one slow or failing step cannot eat the others' time.
# Results land in $OUT (or bench/results) as JSON + markdown, named by device.
#   bash bench/run_gpu.sh            # call 1, the product path (wheels in .whl/ are installed first)
#   bash bench/run_gpu.sh speed      # call 2, speed: attention kernels x compile x FP8 matmul, step cache
#   bash bench/run_gpu.sh multigpu   # a machine with several GPUs: s/step on 1, 2, 4 GPUs under 16 GiB caps
#   REHEARSE=1 bash bench/run_gpu.sh [speed]  # every step on the CPU at tiny size (before a device call)
# The device has no package index: carry optimum-quanto, bitsandbytes and diffusers as wheels in .whl/.
set -u
out=${OUT:-bench/results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
scratch=${SCRATCH:-/tmp/lowvram-bench}
if [ -n "${REHEARSE:-}" ]; then
  size="--model-size tiny --device cpu"; video() { echo "--size 128x96 --frames 17"; }; cap() { :; }; tiny=--tiny
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  size="--model-size full"; video() { echo "--resolution $1 --frames 129"; }; cap() { echo "--cap-gb $1"; }; tiny=
fi
if [ "${1:-}" = speed ]; then
  # Every attention kernel x compile x FP8 dequant/_scaled_mm at 720p and 544p x 129 under a 16 GiB
  # cap (s/step, peak VRAM, error vs default SDPA), then the step cache presets on full 50-step runs
  # at 960x544x33 (DiT seconds, forwards, PSNR of decoded frames vs uncached). 13B random FP8 DiT.
  if [ -n "${REHEARSE:-}" ]; then speed_args="--tiny --cache-steps 6 --budget-s 120"; else speed_args="--cap-gb 16 --budget-s 420"; fi
  timeout 540 python3 -m bench.bench_speed $speed_args --out "$out" > "$out/speed.log" 2>&1 || echo "   speed: exit $?"
  tail -4 "$out/speed.log"; ls "$out"/bench_speed-*.md
  exit 0
fi
if [ "${1:-}" = multigpu ]; then
  # Needs a machine with >= 2 GPUs: s/step at 720p x 129 on 1, 2 and 4 GPUs (sequence parallel, usp),
  # every GPU capped at 16 GiB with the 16gb profile; the summary's s/step column gives the speedup.
  if [ -n "${REHEARSE:-}" ]; then gpus=2; else gpus=$(nvidia-smi -L | wc -l); fi
  if [ "$gpus" -lt 2 ]; then echo "multigpu: $gpus GPU visible, nothing to measure"; exit 0; fi
  for n in 1 2 4; do
    [ "$n" -le "$gpus" ] || break
    timeout 240 python3 -m cli bench --scratch "$scratch" --layout official-fp8 --steps 3 $size $(video 720p) --profile 16gb \
      $(cap 16) --gpus $n --json > "$out/lowvram-bench-720p-16gb-gpus$n.json" 2> "$out/lowvram-bench-720p-16gb-gpus$n.log" \
      || echo "   gpus $n: exit $?"
  done
  python3 -m bench.summarize_bench "$out"
  exit 0
fi
bench() {  # NAME SECONDS ARGS...: one `lowvram bench` configuration -> $out/lowvram-bench-NAME.json
  local name=$1 limit=$2; shift 2
  echo "== bench $name ($limit s)"
  timeout "$limit" python3 -m cli bench --scratch "$scratch" --layout official-fp8 --steps 2 $size "$@" --json \
    > "$out/lowvram-bench-$name.json" 2> "$out/lowvram-bench-$name.log" || echo "   $name: exit $?"
}
# 1. the product's path end to end at 720p x 129 (writes the full-size model once: Tencent's FP8 DiT
#    pair, Llama-3-8B, CLIP-L, VAE, ~30 GB; the first run also builds the NF4 encoder cache)
bench 720p-16gb 240 $(video 720p) --profile 16gb $(cap 16)
bench 720p-24gb 120 $(video 720p) --profile 24gb $(cap 24)
# 2. smaller cards (the DiT steps are what matter; the decode runs too if time allows)
bench 540p-8gb 75 $(video 540p) --profile 8gb $(cap 8)
bench 720p-12gb 75 $(video 720p) --profile 12gb $(cap 12)
python3 -m bench.summarize_bench "$out"
# 3. CUDA tests that fail when streaming's event waits, INT8/NF4 on CUDA or resume on CUDA break
timeout 60 python3 -m pytest -q -m cuda -p no:cacheprovider tests/ > "$out/cuda-tests.txt" 2>&1; tail -3 "$out/cuda-tests.txt"
# 4. diffusers' group offloading with FP8 layerwise casting at the same caps, and the DiT-only streaming runs
timeout 60 python3 -m bench.bench_streaming --out "$out" --budget-s 45 $tiny --caps 16
# 5. bf16 / FP8 dequant / FP8 _scaled_mm / INT8 forward at 544p x 33
timeout 40 python3 bench/bench_quant.py --out "$out" $tiny
# 6. the bf16 13B forward (all resident), if time is left
timeout 60 python3 bench/bench_dit_forward.py --repeats 1 --out "$out" $tiny
rm -rf "$scratch"
