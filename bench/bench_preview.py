"""Cost of the live preview (`generate --preview`) per step, against the cost of a step.

    python -m bench.bench_preview [--repeats 10] [--out bench/results]

What one preview costs, on this machine's CPU, at 960x544 and 1280x720 with 129 and 261 frames: the
predicted clean latents (x - sigma v), their 16->3 projection (hyvideo/preview.py) and the lossless
animated WebP written atomically (lowvram/generation/preview.py), as the runner does after every
step. In a real run the first two run on the GPU (only the uint8 picture is copied back), so the
CPU timing of them is an upper bound. Two kinds of latents bracket the encoder's work: N(0, 1) noise
(the hardest to compress) and smooth latents (noise at 1/8 size, upsampled: closer to a prediction).

A step is not timed here (the 13B DiT on this CPU would take hours per step): the comparison is
with the fastest step measured, 9.00 s at 960x544x129 on an H200 with every block resident
(bench/results/bench_streaming-NVIDIA-H200.md); a 16-24 GB card streaming blocks is slower, so the
fraction is smaller there. For 261 frames no step is measured; twice the tokens at least double a
step (the linear layers; attention grows four times), so 2 x that step is a lower bound and the
fraction given an upper bound. Results: bench/results/bench_preview-<device>.{json,md} (bench/common.write_results names it; "cpu" here).
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import device_info, write_results
from hyvideo.config import VAE_CONFIGS
from hyvideo.sampler import predicted_clean
from hyvideo.vae import latent_shape
from hyvideo.preview import latent_rgb
from lowvram.generation.preview import write_webp

STEP_544P_129_S = 9.00  # bench/results/bench_streaming-NVIDIA-H200.md, 544x960x129, resident
SIZES = [(960, 544, 129), (960, 544, 261), (1280, 720, 129), (1280, 720, 261)]


def latents(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if kind == "noise":
        return torch.randn(shape, generator=generator)
    _, channels, frames, height, width = shape
    coarse = torch.randn(channels, frames, height // 8, width // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[None]


def time_preview(shape: tuple[int, ...], kind: str, repeats: int, folder: Path) -> dict:
    """Median seconds of the two parts of a preview: x0 and its projection (on the GPU in a real
    run), then the WebP encoded and written (on the CPU in any run)."""
    generator = torch.Generator().manual_seed(0)
    x, velocity = latents(kind, shape, generator), latents(kind, shape, generator)
    sigma = torch.tensor(0.5)
    project, write = [], []
    for _ in range(1 + repeats):  # the first one warms up PyAV and libwebp
        began = time.perf_counter()
        frames = latent_rgb(predicted_clean(x, velocity, sigma))
        projected = time.perf_counter()
        write_webp(frames, folder / "preview.webp")
        project.append(projected - began)
        write.append(time.perf_counter() - projected)
    return {"project_s": round(statistics.median(project[1:]), 4), "write_s": round(statistics.median(write[1:]), 4),
            "project_min_s": round(min(project[1:]), 4), "write_min_s": round(min(write[1:]), 4),
            "bytes": (folder / "preview.webp").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for width, height, frames in SIZES:
            shape = (1, *latent_shape(frames, height, width, VAE_CONFIGS["884-16c-hy"]))
            step_s = STEP_544P_129_S * (2 if frames == 261 else 1) if height == 544 else None
            for kind in ("noise", "smooth"):
                timing = time_preview(shape, kind, args.repeats, Path(scratch))
                total = timing["project_s"] + timing["write_s"]
                shares = {"percent_gpu_run": round(100 * timing["write_s"] / step_s, 2),
                          "percent_gpu_run_min": round(100 * timing["write_min_s"] / step_s, 2),
                          "percent_all_on_cpu": round(100 * total / step_s, 2)} if step_s else {}
                runs.append({"size": f"{width}x{height}x{frames}", "latents": list(shape), "kind": kind, **timing,
                             "step_s": step_s, **shares})
    results = {"bench": "preview", "device": device_info(torch.device("cpu")), "threads": torch.get_num_threads(),
               "load_average": [round(load, 1) for load in os.getloadavg()],  # this machine is shared: contention slows it
               "step_reference": "960x544x129: 9.00 s/step, H200, all blocks resident (bench_streaming-NVIDIA-H200.md); "
                                 "x261: 2x that, a lower bound", "runs": runs}
    for run in runs:
        print(run, flush=True)
    path = write_results(args.out, "bench_preview", results)
    lines = ["# Live preview cost per step (CPU)", "",
             f"{results['device']['name']}, {results['threads']} threads, torch {results['device']['torch']}, load average "
             f"{results['load_average']} (a shared machine); medians of {args.repeats} previews. project: x0 and the 16->3 "
             "projection (on the GPU in a real run); write: lossless WebP encoded and written atomically (CPU). "
             f"Step: {results['step_reference']}.", "",
             "Times are median (min); the min is the least disturbed by the machine's other work.", "",
             "| size | latents | kind | project ms | write ms | file kB | step s | % of a step, GPU run (write) | % all on CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['size']} | {'x'.join(map(str, run['latents'][1:]))} | {run['kind']} | "
                     f"{run['project_s'] * 1000:.1f} ({run['project_min_s'] * 1000:.1f}) | "
                     f"{run['write_s'] * 1000:.1f} ({run['write_min_s'] * 1000:.1f}) | {run['bytes'] / 1000:.0f} | {run['step_s'] or '-'} | "
                     f"{run.get('percent_gpu_run', '-')} ({run.get('percent_gpu_run_min', '-')}) | {run.get('percent_all_on_cpu', '-')} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
