"""Step cache presets (off / safe / fast; HunyuanVideo-1.5: off / deepcache) on full runs: DiT
forwards, DiT time, and how far the result moves from the uncached run (final latents, and PSNR of
the decoded frames).

    python -m bench.bench_step_cache --tiny --out bench/results             # CPU, tiny model, 50 steps
    python -m bench.bench_step_cache --tiny --model 1.5-480p_t2v --video 96x64x9   # CPU, tiny 1.5, DeepCache
    python -m bench.bench_step_cache --cap-gb 16 --scratch /tmp/lowvram-bench  # GPU: 13B random weights,
                                                                            # 960x544x33, 50 steps, 16gb profile
    python -m bench.bench_step_cache --cap-gb 16 --model 1.5-720p_t2v       # GPU: 1.5, 1280x720x121

Each preset is one `lowvram bench` run (the generate path end to end). The frames compared are
decoded from each run's final latents by the run's own (tiled) decoder, in memory: the mp4 is lossy.
Random weights: the skip pattern and the deviations say nothing about real-model quality (see
hyvideo/step_cache.py for the published HunyuanVideo figures).
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.common import device_info, finish, psnr
from hyvideo.checkpoint import find_model_files
from lowvram.generation.bench import BenchOptions, run_bench
from lowvram.profiles import Overrides
from lowvram.generation.preflight import plan_for_run
from lowvram.generation.run_folder import find_run
from lowvram.stages import Stages

PRESETS = {"13B": ("off", "safe", "fast"), "1.5": ("off", "deepcache")}


def decoded_frames(result: dict, scratch: Path) -> torch.Tensor:
    """The uint8 frames [F, H, W, 3] of a bench run, decoded again from its final latents."""
    run = find_run(scratch / "runs", result["run_id"])
    files = find_model_files(Path(result["model"]["folder"]))
    stages = Stages(files, plan_for_run(run, files), torch.device(result["device"]), "sdpa")
    vae = stages.vae()
    frames = stages.decode(vae, load_file(result["final_latents"])["latents"], lambda done, total: None)
    del vae
    return frames


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cap-gb", type=float, default=None)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/lowvram-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--video", default="128x96x17", help="with --tiny: WIDTHxHEIGHTxFRAMES")
    parser.add_argument("--model", default=None, help="1.5-<variant>: HunyuanVideo-1.5 text-to-video (off vs deepcache)")
    args = parser.parse_args(argv)

    v15 = args.model is not None
    if args.tiny:
        width, height, frames = map(int, args.video.split("x"))
        options = dict(width=width, height=height, frames=frames, profile="plain", model_size="tiny",
                       layout="diffusers" if v15 else "official", device="cpu")
    elif v15:
        options = dict(width=1280, height=720, frames=121, profile="auto", model_size="full", layout="diffusers",
                       cap_bytes=None if args.cap_gb is None else int(args.cap_gb * 2**30))
    else:
        options = dict(width=960, height=544, frames=33, profile="16gb", model_size="full", layout="official-fp8",
                       cap_bytes=None if args.cap_gb is None else int(args.cap_gb * 2**30))
    device = torch.device("cpu" if args.tiny else "cuda")
    results = {"benchmark": "step_cache", "model_name": args.model or "t2v", "device": device_info(device), "steps": args.steps,
               "cap_gb": args.cap_gb,
               "video": f"{options['width']}x{options['height']}x{options['frames']}", "model": options["model_size"],
               "note": "random weights: the skip pattern and deviations say nothing about real-model quality", "runs": []}
    reference_latents = reference_frames = None
    for preset in PRESETS["1.5" if v15 else "13B"]:
        result = run_bench(BenchOptions(args.scratch, steps=args.steps, overrides=Overrides(step_cache=preset), model=args.model,
                                        **options))
        latents = load_file(result["final_latents"])["latents"]
        frames = decoded_frames(result, args.scratch)
        computed = result["stats"]["dit"]["computed_steps"]
        run = {"preset": preset, "profile": result["profile"], "dit_forwards": len(computed), "computed_steps": computed,
               "forward_ratio": round(args.steps / len(computed), 2), "peak_vram_gb": result["stages"]["dit"]["vram_gb"],
               # the tiny model's CPU seconds are noise (other processes share 2 cores): not a speed figure
               "dit_seconds": None if args.tiny else result["stages"]["dit"]["seconds"]}
        if reference_latents is None:
            reference_latents, reference_frames = latents, frames
        else:
            run["latents_rel_error"] = round(float((latents - reference_latents).norm() / reference_latents.norm()), 6)
            run["frames_psnr_db"] = psnr(frames, reference_frames)
        results["runs"].append(run)
    off_seconds = results["runs"][0]["dit_seconds"]
    for run in results["runs"][1:]:
        if off_seconds and run["dit_seconds"]:
            run["dit_speedup"] = round(off_seconds / run["dit_seconds"], 2)
    name = "step_cache" + (f"-{args.model}" if v15 else "") + ("-tiny" if args.tiny else "")
    finish(args.out, name, results)
    write_markdown(args.out, name, results)
    return results


def write_markdown(out_dir: Path, name: str, results: dict) -> Path:
    slug = results["device"].get("name", "cpu").replace(" ", "-").replace("/", "-")
    cap = f", cap {results['cap_gb']:g} GiB" if results["cap_gb"] else ""
    lines = [f"# Step cache presets on {results['device'].get('name')} ({results['model']} {results['model_name']} model, "
             f"{results['video']}, {results['steps']} steps{cap})", "", results["note"] + ".", "",
             "| preset | DiT forwards | fewer forwards | DiT s | DiT speedup | final latents rel. error | frames PSNR dB |",
             "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines.append(f"| {run['preset']} | {run['dit_forwards']} | {run['forward_ratio']}x | {run['dit_seconds'] or '-'} | "
                     f"{run.get('dit_speedup', '-')} | {run.get('latents_rel_error', '-')} | {run.get('frames_psnr_db', '-')} |")
    path = out_dir / f"{name}-{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main()
