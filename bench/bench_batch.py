"""A batch against separate runs (issue 15): the time to the first denoising step of clip 1 (the
DiT is loaded and placed) and of clips 2+ (it is not), and the total for 3 clips x 2 steps as one
batch and as 3 separate runs, each of which loads every model.

    python -m bench.bench_batch --tiny --out bench/results                   # CPU, tiny model
    python -m bench.bench_batch --scratch /tmp/lowvram-bench --out DIR        # GPU: 13B random weights, 16gb profile

Both go through the generate path (`start_batch` + `execute_batch`, `start_run` + `execute`). The
batch runs first; the weights are then in the page cache for the separate runs, if they were not
already: run it where `--scratch` holds the full-size model an earlier benchmark wrote and read
(e.g. after run_gpu.sh's `lowvram bench` configurations, before their scratch is removed).
"""

import argparse
import time
from pathlib import Path

import torch

from bench.common import device_info, finish
from hyvideo.pipeline import GenerationRequest
from lowvram.generation.batch import Clip, execute_batch, start_batch
from lowvram.generation.bench import PROMPT, ensure_synthetic_model
from lowvram.generation.preflight import RunOptions, start_run
from lowvram.generation.runner import execute
from lowvram.profiles import Overrides
from lowvram.progress import Reporter

CLIPS, STEPS = 3, 2


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/lowvram-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    size, layout, profile, device = ("tiny", "official", "plain", "cpu") if args.tiny else ("full", "official-fp8", "16gb", "cuda")
    width, height, frames = (64, 48, 9) if args.tiny else (512, 288, 17)
    root = ensure_synthetic_model(args.scratch, size, layout, Reporter())
    requests = [GenerationRequest(f"{PROMPT}, take {i}", width, height, frames, STEPS, seed=i) for i in range(CLIPS)]

    def options(request: GenerationRequest, folder: str) -> RunOptions:
        return RunOptions(request, root, args.scratch / folder, profile, Overrides(attention="sdpa"), device)

    began = time.perf_counter()
    batch, runs, files, plan = start_batch(options(requests[0], "runs-batch"), [Clip(r) for r in requests])
    batched = execute_batch(batch, runs, files, plan).runs
    batch_seconds = time.perf_counter() - began
    began = time.perf_counter()
    separate = [execute(*start_run(options(request, "runs-separate"))) for request in requests]
    separate_seconds = time.perf_counter() - began

    results = {"benchmark": "batch", "device": device_info(torch.device(device)), "model": size, "profile": plan.profile.name,
               "video": f"{width}x{height}x{frames}", "clips": CLIPS, "steps": STEPS,
               "batch_seconds": round(batch_seconds, 2), "separate_seconds": round(separate_seconds, 2),
               "speedup": round(separate_seconds / batch_seconds, 2), "runs": []}
    for mode, found in (("batch", batched), ("separate", separate)):
        for clip, result in enumerate(found, 1):
            results["runs"].append({"mode": mode, "clip": clip, "to_first_step_s": result.measured["dit"]["load_seconds"],
                                    **{f"{stage}_s": result.measured[stage]["seconds"] for stage in ("text", "dit", "vae")
                                       if stage in result.measured}})
    finish(args.out, "batch" + ("-tiny" if args.tiny else ""), results)
    print(f"batch {results['batch_seconds']} s, separate {results['separate_seconds']} s ({results['speedup']}x)")
    return results


if __name__ == "__main__":
    main()
