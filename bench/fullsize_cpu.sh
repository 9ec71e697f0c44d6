#!/usr/bin/env bash
# Full-size host-side check (not CI): ~60 GB scratch disk, 15-40 minutes on 2 cores.
# Writes the 13B checkpoints with random weights, quantizes them with `lowvram quantize` from both
# layouts (FP8 and INT8), loads the FP8 cache on the host, and repeats the FP8 quantize inside a
# 16 GiB memory limit; results go to bench/results/fullsize_cpu-<machine>.{json,md}.
#   bash bench/fullsize_cpu.sh [SCRATCH_DIR] [extra bench/fullsize_cpu.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="${1:-/tmp/lowvram-fullsize}"
shift || true
python -m bench.fullsize_cpu --scratch "$scratch" "$@"
