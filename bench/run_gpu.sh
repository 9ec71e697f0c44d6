#!/usr/bin/env bash
# The GPU measurements (issue 25) in ONE device call of at most 8 minutes, most valuable first. Each
# step has a hard time limit: its own, or what is left of the budget (BUDGET_S, default 470 s), and a
# step that would get less than it needs is skipped. Each step writes its result as soon as it has
# it, and after every step everything so far is packed into $OUT/gpu-results.tar.gz (one file: the
# device returns at most 8), with $OUT/progress.log beside it: a kill keeps what was done.
#
#   bash bench/run_gpu.sh fetch-wheels   # here, where pip reaches an index: the wheels into .whl/
#   bash bench/run_gpu.sh                # on the GPU machine, carrying .whl (device tool: carry [".whl"])
#   REHEARSE=1 bash bench/run_gpu.sh     # the same steps, commands, checks and archive on the CPU, tiny
#   I2V=1 bash bench/run_gpu.sh          # the image-to-video line instead (its own device call, below)
#   V15=1 bash bench/run_gpu.sh          # the HunyuanVideo-1.5 line instead (its own device call, below)
#
# Steps (issue 25's order of value; limit = most seconds, need = fewest worth starting with):
#   0 setup: the wheels installed (a failure stops the run with one line), imports checked, the
#     packages the product's runs need checked as preflight checks them
#   1 write-model        the full-size random model, Tencent's FP8 DiT pair + Llama-3-8B + CLIP + VAE
#                        (30.5 GB), drawn on the GPU (bench/write_model.py)             limit 120, need 30
#   2 720p-16gb          lowvram bench 1280x720x129 under a 16 GiB cap, 2 steps, defaults
#                        (auto profile and attention; builds the NF4 encoder cache)     limit 210, need 90
#   3 720p-16gb-compile  the same, fastest attention (auto) and --compile: step 1 compiles, step 2
#                        is the speed; its decode repeats step 2's, and if the limit cuts it,
#                        the run's manifest still holds the DiT stage                     limit 150, need 90
#   4 540p-8gb           960x544x129 under an 8 GiB cap                                  limit 110, need 60
#   5 cuda-tests         pytest -m cuda                                                  limit 100, need 40
#   6 attention          each kernel's time per joint attention call at 720p, x 60 blocks
#                        (bench/bench_attention.py)                                      limit 45, need 20
#   7 diffusers-16gb     diffusers' group offloading (FP8 layerwise casting) at 720p under
#                        the same 16 GiB cap (bench/bench_streaming.py --runs diffusers)  limit 120, need 60
#   8 720p-12gb          lowvram bench 1280x720x129 under a 12 GiB cap                   rest, need 90
# Per step the archive holds its stdout (a bench's JSON) and stderr (progress lines), for a bench
# its run's manifest (per-stage measurements, step seconds: there even when the limit cut the run),
# steps.tsv (name, exit code, seconds, limit; 124 = the limit stopped it) and progress.log.
# Not in this call (each its own, longer one): python -m bench.bench_speed (kernels x compile x
# _scaled_mm x step cache, ~9 min) and, on a machine with several GPUs, `lowvram bench --gpus N`.
#
# I2V=1: image-to-video (issue 22) in its own call, the setup as above, then (the T2V models in
# $SCRATCH removed first: the I2V folder's 43 GB and its 13 GB FP8 cache do not fit the 64 GiB disk
# beside them, nor its time the T2V call's budget):
#   1 write-model-i2v    the full-size random HunyuanVideo-I2V, token_replace (bf16 DiT, LLaVA-Llama-3-8B
#                        with its vision tower, CLIP, VAE: 43 GB), drawn on the GPU       limit 200, need 60
#   2 i2v-720p-16gb      lowvram bench --image (a 1920x1080 PNG written here: its 720p bucket is
#                        1248x704) x 129 under a 16 GiB cap, 2 steps, defaults (auto: the 16gb profile,
#                        FP8 DiT from the quantize-once cache it builds, blocks streamed; NF4 LLaVA)
#                                                                                        rest, need 120
# Its JSON, log and manifest are saved and summarized as the T2V lines' (same names, same markdown).
#
# V15=1: HunyuanVideo-1.5 text-to-video (issue 24) in its own call, the setup as above, then (the
# 13B models in $SCRATCH removed first, as for I2V=1):
#   1 write-model-v15    the full-size random HunyuanVideo-1.5 720p_t2v, diffusers layout (8.3B DiT
#                        stored in bf16, Qwen2.5-VL-7B's language model, glyph byT5, VAE: 34 GB),
#                        drawn on the GPU (bench/write_model.py --size full-1.5-720p_t2v) limit 150, need 45
#   2 v15-720p-16gb      lowvram bench --model 1.5-720p_t2v 1280x720 x 121 under a 16 GiB cap, 2 steps,
#                        defaults (auto; the FP8 DiT from the quantize-once cache it builds, real CFG:
#                        2 forwards a step; NF4 Qwen2.5-VL)                             rest, need 120
#
# Wheels: the GPU machine has no package index (Python 3.12, torch 2.11+cu130). `fetch-wheels`
# downloads, with pip here, the packages it lacks, pinned to the versions tested here, as wheels for
# CPython 3.12 on manylinux x86_64 (`pip download --no-deps --only-binary=:all: --python-version
# 3.12 --implementation cp --platform manylinux_2_28_x86_64 ... -d .whl NAME==VERSION`): av (the mp4
# writer), bitsandbytes (NF4), optimum-quanto (INT8), diffusers (the oracle and the group-offloading
# comparison) and its importlib_metadata, sageattention, yunchang. Their other needs (numpy, ninja,
# safetensors, huggingface-hub, Pillow, requests, regex, filelock, packaging, triton) are there.
# bitsandbytes ships one 4-26 MB kernel library per CUDA version (43 MB wheel); its copy in .whl/
# keeps the CPU library and CUDA 13.0's only (torch there is cu130), so that everything stays under
# the 64 MiB a device call may carry (the working tree included): ~47 MB. .whl/ is git-ignored.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # the device's python3 holds torch; here: PYTHON=.venv/bin/python
WHEELS="optimum-quanto==0.2.7 bitsandbytes==0.50.2 diffusers==0.42.1 importlib_metadata==8.7.0 sageattention==1.0.6 yunchang==0.6.4 av==18.1.0"
BNB_CUDA=130  # the bitsandbytes kernel library kept: the device's torch is built for CUDA 13.0

if [ "${1:-}" = fetch-wheels ]; then
  rm -rf .whl && mkdir -p .whl
  platforms=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
  done
  for spec in $WHEELS; do
    $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl "$spec" \
      || { echo "fetch-wheels: $spec did not resolve"; exit 1; }
  done
  $PYTHON - "$BNB_CUDA" <<'EOF'
import sys, zipfile
from pathlib import Path
keep = f"libbitsandbytes_cuda{sys.argv[1]}.so"
wheel = next(Path(".whl").glob("bitsandbytes-*.whl"))
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    dropped = {n for n in src.namelist() if "/libbitsandbytes_" in n and not n.endswith((keep, "_cpu.so"))}
    for item in src.infolist():
        if item.filename in dropped:
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if line.split(b",")[0].decode() not in dropped)
        dst.writestr(item, data)
slim.replace(wheel)
print(f"bitsandbytes: kept {keep} and the CPU library, dropped {len(dropped)} others")
EOF
  du -ch .whl/*.whl | tail -1
  total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
  [ "$total" -le $((60 * 2**20)) ] || { echo "fetch-wheels: .whl/ holds $total bytes, over the 60 MiB left beside the working tree"; exit 1; }
  exit 0
fi

out=${OUT:-/tmp/lowvram-gpu-out}   # what comes back from the device: the archive, progress.log, the summary
res=${RESULTS:-/tmp/lowvram-gpu-results}  # everything, packed into $out after every step
scratch=${SCRATCH:-/tmp/lowvram-bench}    # the random model (30 GB at full size, reused) and the runs
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$out" && rm -rf "$res" && mkdir -p "$res"
export PYTHONUNBUFFERED=1

log() { echo "$(date +%H:%M:%S) +${SECONDS}s $*" | tee -a "$res/progress.log"; }
pack() {
  cp "$res/progress.log" "$out/progress.log"
  tar -czf "$out/.gpu-results.tar.gz" -C "$res" . && mv "$out/.gpu-results.tar.gz" "$out/gpu-results.tar.gz"
}
step() {  # NAME LIMIT NEED CMD...: CMD > NAME.out 2> NAME.log under min(LIMIT, budget left); skipped under NEED
  local name=$1 max=$2 need=$3 left limit began rc
  shift 3
  left=$((BUDGET_S - SECONDS))
  limit=$((left < max ? left : max))
  if [ "$limit" -lt "$need" ]; then
    log "skip $name: ${left} s of the budget left, it needs ${need} s"
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$res/steps.tsv"
    pack
    return 0
  fi
  log "start $name (limit ${limit} s)"
  touch "$res/.started"
  began=$SECONDS
  timeout -k 10 "$limit" "$@" > "$res/$name.out" 2> "$res/$name.log"
  rc=$?
  log "end $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)'), $((SECONDS - began)) s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - began))" "$limit" >> "$res/steps.tsv"
  tail -n 3 "$res/$name.log" | sed "s/^/    /"
  pack
  return 0
}

layout=official-fp8  # Tencent's FP8 DiT pair (T2V); the I2V release has none: official, FP8 from the cache
[ -n "${I2V:-}" ] && layout=official
[ -n "${V15:-}" ] && layout=diffusers  # the 1.5 bench's random text encoders are written in that layout
if [ -n "${REHEARSE:-}" ]; then
  device=cpu; model_size=tiny
  video() { echo "--size 128x96 --frames 17"; }  # every size: the tiny model at demo size
  cap() { echo "--profile ${1}gb"; }             # on the CPU no VRAM to cap: the profile the cap would pick
  tiny=(--tiny); attention_size=96x128x17; streaming_size=32x48x9
else
  device=cuda; model_size=full
  video() { echo "--resolution $1 --frames ${2:-129}"; }  # 1.5: 121 frames
  cap() { echo "--cap-gb $1"; }
  tiny=(); attention_size=720x1280x129; streaming_size=720x1280x129
fi

# -- 0: setup ----------------------------------------------------------------------------------
log "run_gpu: $([ -n "${REHEARSE:-}" ] && echo rehearsal on the CPU || echo GPU run)$([ -n "${I2V:-}" ] && echo ', image-to-video')$([ -n "${V15:-}" ] && echo ', HunyuanVideo-1.5'), budget ${BUDGET_S} s"
printf 'step\texit\tseconds\tlimit\n' > "$res/steps.tsv"
git log -1 --format='%H %s' > "$res/commit.txt" 2>/dev/null
if [ -z "${REHEARSE:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$res/gpu.txt"
fi
wheels=${WHEELS_DIR:-.whl}
if ls "$wheels"/*.whl > /dev/null 2>&1; then
  site=${SITE:-/tmp/site}
  if ! $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
      > "$res/wheels.log" 2>&1; then
    log "stop: installing the wheels in $wheels/ failed: $(grep -m1 -i error "$res/wheels.log")"
    pack
    exit 1
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  log "wheels installed: $(ls "$wheels" | sed 's/-py3.*\|-cp3.*//' | tr '\n' ' ')"
else
  log "no wheels in $wheels/ (bash bench/run_gpu.sh fetch-wheels): using the installed packages"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# Import each package (a broken wheel shows here, not in step 4), then the product's own check of
# what its runs need (lowvram/generation/packages.py): a missing one stops the run here.
if ! timeout 120 $PYTHON - "$device" > "$res/imports.txt" 2>&1 <<'EOF'
import importlib, sys
from lowvram.generation.packages import check_packages, needed_packages
failed = []
for module, use in (("av", "mp4"), ("bitsandbytes", "NF4"), ("optimum.quanto", "INT8"), ("diffusers", "oracle, step 7"),
                    ("sageattention", "attention kernel"), ("yunchang", "several GPUs"), ("triton", "compile, sage")):
    try:
        found = importlib.import_module(module)
        print(f"{module}: {getattr(found, '__version__', 'ok')} ({use})")
    except Exception as error:
        failed.append(module)
        print(f"{module}: MISSING ({use}): {type(error).__name__}: {' '.join(str(error).split())[:150]}")
check_packages("fp8", "nf4", 129, sys.argv[1])  # the 16 GB profile's needs, as preflight checks them (one line)
broken = [pip for module, pip, _ in needed_packages("fp8", "nf4", 129, sys.argv[1]) if module in failed]
if broken:
    sys.exit(f"installed but failing to import, and the runs need them: {' '.join(broken)}")
EOF
then
  log "stop: $(tail -n 1 "$res/imports.txt")"
  pack
  exit 1
fi
log "imports: $(grep -c MISSING "$res/imports.txt") missing: $(grep MISSING "$res/imports.txt" | cut -d: -f1 | tr '\n' ' ')"
pack

bench() {  # NAME LIMIT NEED ARGS...: one `lowvram bench` -> lowvram-bench-NAME.json (+ .log, .manifest.json)
  local name=$1 limit=$2 need=$3
  shift 3
  step "lowvram-bench-$name" "$limit" "$need" $PYTHON -m cli bench --scratch "$scratch" --layout "$layout" \
    --model-size "$model_size" --device "$device" --steps 2 "$@" --json
  mv "$res/lowvram-bench-$name.out" "$res/lowvram-bench-$name.json" 2> /dev/null
  local manifest
  manifest=$(find "$scratch/runs" -name manifest.json -newer "$res/.started" 2> /dev/null | head -n 1)
  [ -n "$manifest" ] && cp "$manifest" "$res/lowvram-bench-$name.manifest.json"
  pack
}

summarize() {
  $PYTHON -m bench.summarize_bench "$res" > "$res/summary.out" 2>&1 && cp "$res"/lowvram_bench-*.md "$out"/ 2> /dev/null
  log "done: $(awk -F'\t' 'NR > 1 {printf "%s %s %ss; ", $1, $2, $3}' "$res/steps.tsv")"
  pack
}

# -- I2V=1: 1-2 ------------------------------------------------------------------------------------
if [ -n "${I2V:-}" ]; then
  rm -rf "$scratch"/model-*-official-fp8 "$scratch"/model-full-official "$scratch"/model-*-1.5-*  # disk for the I2V one
  mkdir -p "$scratch"
  image="$scratch/i2v-first-frame.png"  # 16:9, larger than the bucket: resized and center-cropped as generate does
  $PYTHON -c "import numpy as np, PIL.Image as I, sys; y, x = np.mgrid[0:1080, 0:1920]; I.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(sys.argv[1])" "$image"
  step write-model-i2v 200 60 $PYTHON -m bench.write_model --scratch "$scratch" --size "${model_size}-i2v" --layout "$layout" --device "$device"
  bench i2v-720p-16gb 600 120 --image "$image" $(video 720p) $(cap 16)
  summarize
  exit 0
fi

# -- V15=1: 1-2 ------------------------------------------------------------------------------------
if [ -n "${V15:-}" ]; then
  find "$scratch" -maxdepth 1 -name 'model-*' ! -name 'model-*-1.5-*' -exec rm -rf {} + 2> /dev/null  # the 13B models: disk for 1.5
  mkdir -p "$scratch"
  step write-model-v15 150 45 $PYTHON -m bench.write_model --scratch "$scratch" --size "${model_size}-1.5-720p_t2v" --layout "$layout" --device "$device"
  bench v15-720p-16gb 600 120 --model 1.5-720p_t2v $(video 720p 121) $(cap 16)
  summarize
  exit 0
fi

# -- 1-8 -----------------------------------------------------------------------------------------
step write-model 120 30 $PYTHON -m bench.write_model --scratch "$scratch" --size "$model_size" --layout official-fp8 --device "$device"
bench 720p-16gb 210 90 $(video 720p) $(cap 16)
bench 720p-16gb-compile 150 90 $(video 720p) $(cap 16) --attention auto --compile
bench 540p-8gb 110 60 $(video 540p) $(cap 8)
step cuda-tests 100 40 $PYTHON -m pytest -q -m cuda -p no:cacheprovider -rs --continue-on-collection-errors \
  --junitxml="$res/cuda-tests.xml" tests/
step attention 45 20 $PYTHON -m bench.bench_attention --out "$res" --size "$attention_size" "${tiny[@]}"
step diffusers-16gb 120 60 $PYTHON -m bench.bench_streaming --out "$res" --runs diffusers --sizes "$streaming_size" \
  --caps 16 --steps 2 --budget-s 100 "${tiny[@]}"
bench 720p-12gb 600 90 $(video 720p) $(cap 12)
summarize
