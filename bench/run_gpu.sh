#!/usr/bin/env bash
# All GPU benchmarks in one device call (about 9 minutes on an H100/H200), each with its own time
# limit so one slow or failing run cannot eat the others' time. Results land in $OUT (or
# bench/results) as JSON + markdown, named by device.
# Wheels found in .whl/ (e.g. diffusers and optimum-quanto for a machine without a package index)
# are installed into /tmp/site first.
set -u
out=${OUT:-bench/results}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 120 python3 bench/bench_dit_forward.py --repeats 1 --out "$out"   # issue 2: bf16 forward, 544p + 720p
timeout 90 python3 bench/bench_quant.py --out "$out"                      # issue 3: bf16 / fp8 / scaled_mm / int8
timeout 330 python3 -m bench.bench_streaming --out "$out" --budget-s 300  # issue 4: streaming vs resident vs diffusers
