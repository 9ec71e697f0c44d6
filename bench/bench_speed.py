"""Speed of one streamed DiT step under a memory cap for every attention kernel, with and without
regional torch.compile, with the FP8 linears dequantized or run by `_scaled_mm`.

    python -m bench.bench_speed --out bench/results --cap-gb 16 --budget-s 300   # GPU, 13B random FP8
    python -m bench.bench_speed --tiny --out /tmp/bench                            # CPU smoke run

The 13B DiT with random FP8 weights is streamed by the 16 GB profile's plan at each size (as
bench/bench_streaming.py), under torch.cuda.set_per_process_memory_fraction(cap / total). Per
size, the variants in order (each guarded and within the time budget, most informative first):
PyTorch's default SDPA (the reference: today's path), each attention kernel that passes its probe
(lowvram/attention_choice.py), then the fastest kernel with `_scaled_mm`, with --compile (its
first step compiles; the last step is the speed), and with both. Recorded: s/step of the last
step, peak VRAM, and the relative error of the step's output against the reference.

Then the step cache presets (hyvideo/step_cache.py) on full denoising runs (`--cache-size`,
default 544x960x33, 50 steps) with the default kernel: wall time of the DiT loop per preset, DiT
forwards, and the PSNR of the decoded frames (a random-weight VAE, tiled as the 16 GB profile)
against the uncached run's. Writes OUT/bench_speed-<device>.{json,md}.
"""

import argparse
import time
from pathlib import Path

import torch

from bench.bench_streaming import Bench, Recorder, _fmt, build_fp8_dit, make_inputs, parse_sizes
from bench.common import psnr, random_init_
from hyvideo.config import DIT_CONFIGS, VAE_CONFIGS
from hyvideo.pipeline import GenerationRequest, decode, denoise
from hyvideo.text_encoder import TextEmbeddings
from hyvideo.vae import CausalVAE
from lowvram.attention_choice import candidates, probe
from lowvram.compile import compile_blocks
from lowvram.planner import plan
from lowvram.stages import make_step_cache
from lowvram.streaming import BlockStreamer
from lowvram.tiled_vae import TiledVAE
from quant.fp8 import scaled_mm_unavailable_reason, set_scaled_mm


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# Step speed by kernel ({meta.get('device_name')}, torch {meta.get('torch')}, cap {meta.get('cap_gb')} GiB)", "",
             "| size | attention | compile | FP8 matmul | s/step (last) | s/step (all) | peak GiB | rel. error vs default SDPA | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    cache_rows = [r for r in data["results"] if r.get("run") == "step cache"]
    for r in data["results"]:
        if r.get("run") == "step cache":
            continue
        steps = r.get("step_s") or []
        lines.append("| " + " | ".join([
            r.get("size", ""), r.get("attention", ""), {True: "yes", False: "no"}.get(r.get("compile"), ""), r.get("fp8_matmul", ""),
            _fmt(steps[-1] if steps else None), " / ".join(f"{s:.2f}" for s in steps), _fmt(r.get("peak_gb")),
            _fmt(r.get("rel_error"), 4), r.get("status", "ok") if not r.get("error") else "error: " + r["error"][:80],
        ]) + " |")
    if cache_rows:
        lines += ["", "## Step cache (default SDPA, dequantized FP8; random weights: the skip pattern says nothing of real quality)", "",
                  "| size | preset | steps | DiT forwards | DiT s | peak GiB | final latents rel. error | frames PSNR dB | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in cache_rows:
            lines.append("| " + " | ".join([
                r["size"], r["cache"], str(r["steps"]), _fmt(r.get("dit_forwards")), _fmt(r.get("dit_s")), _fmt(r.get("peak_gb")),
                _fmt(r.get("rel_error"), 4), _fmt(r.get("psnr_db")),
                r.get("status", "ok") if not r.get("error") else "error: " + r["error"][:80]]) + " |")
    return "\n".join(lines) + "\n"


class SpeedRecorder(Recorder):
    def __init__(self, out_dir: Path, meta: dict):
        super().__init__(out_dir, meta)
        slug = str(meta.get("device_name", "cpu")).replace(" ", "-").replace("/", "-")
        stem = f"bench_speed-{'tiny-' if meta.get('config') == 'tiny' else ''}{slug}"
        for old in (self.json_path, self.md_path):
            old.unlink(missing_ok=True)
        self.json_path, self.md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        self._write()

    def _write(self) -> None:
        super()._write()
        self.md_path.write_text(markdown(self.data))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tiny", action="store_true", help="tiny config and size (CPU smoke run)")
    parser.add_argument("--sizes", default=None, help="HxWxF list, default 720x1280x129,544x960x129")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cap-gb", type=float, default=16.0)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting runs after this many seconds")
    parser.add_argument("--cache-size", default=None, help="HxWxF of the step cache runs, default 544x960x33")
    parser.add_argument("--cache-steps", type=int, default=50)
    args = parser.parse_args(argv)
    args.no_pin_cap = False  # what Bench.run_ours reads

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    config = DIT_CONFIGS["tiny" if args.tiny else "HYVideo-T/2-cfgdistill"]
    sizes = parse_sizes(args.sizes or ("32x48x9" if args.tiny else "720x1280x129,544x960x129"))
    meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "config": "tiny" if args.tiny else "HYVideo-T/2-cfgdistill", "cap_gb": args.cap_gb, "steps": args.steps,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    recorder = SpeedRecorder(Path(args.out), meta)
    bench = Bench(args, device, recorder)
    bench.config = config
    kernels = {"sdpa": None}
    if device.type == "cuda":
        kernels.update((backend, probe(backend, device, heads=config.heads, head_dim=config.head_dim))
                       for backend in candidates("auto"))
    meta["probes"] = {backend: {"ms": result[0], "why_not": result[1]} for backend, result in kernels.items() if result}
    passed = ["sdpa"] + [b for b, result in kernels.items() if result and result[0] is not None]
    scaled_mm_reason = scaled_mm_unavailable_reason(device)
    meta["scaled_mm"] = scaled_mm_reason or "available"
    bench.model = build_fp8_dit(config, device)
    cache_dir = Path(args.out) / "inductor-cache"

    for size in sizes:
        key, inputs = "x".join(map(str, size)), make_inputs(config, *size, device=device)
        reference, timings = {}, {}

        def variant(attention: str, compile_: bool, scaled_mm: bool) -> None:
            def run(record):
                bench.model.attention_backend = attention
                set_scaled_mm(bench.model, scaled_mm, device)  # before the streamer: its shells copy the flag
                bench.prepare = (lambda streamer: compile_blocks(streamer, cache_dir)) if compile_ else None
                if compile_:
                    torch._dynamo.reset()
                bench.run_ours(size, args.cap_gb, inputs, record)
                if "out" not in reference:
                    reference["out"] = bench.last_output
                record["rel_error"] = float((bench.last_output - reference["out"]).norm() / reference["out"].norm())
                timings[(attention, compile_, scaled_mm)] = record["step_s"][-1]

            base = {"size": key, "run": "speed", "cap_gb": args.cap_gb, "attention": attention, "compile": compile_,
                    "fp8_matmul": "scaled_mm" if scaled_mm else "dequant"}
            bench.guarded(base, key, run)

        for attention in passed:
            variant(attention, False, False)
        best = min((k for k in timings if not k[1] and not k[2]), key=timings.get, default=("sdpa", False, False))[0]
        if scaled_mm_reason is None:
            variant(best, False, True)
        variant(best, True, False)
        if scaled_mm_reason is None:
            variant(best, True, True)
        bench.prepare = None
    bench.model.attention_backend = "sdpa"
    set_scaled_mm(bench.model, False, device)
    step_cache_runs(bench, parse_sizes(args.cache_size or ("32x48x9" if args.tiny else "544x960x33"))[0], args)
    recorder.add({"size": "", "run": "done", "status": f"finished at {time.strftime('%H:%M:%S')}"})
    return 0


def step_cache_runs(bench: Bench, size, args) -> None:
    """off / safe / fast over `args.cache_steps` steps: DiT seconds, forwards, PSNR vs off."""
    height, width, frames = size
    key = f"{height}x{width}x{frames}"
    x, _, text, mask, pooled, _ = make_inputs(bench.config, height, width, frames, bench.device)
    embeddings = TextEmbeddings(text, mask, pooled, [False], [False])
    request = GenerationRequest("bench", width=width, height=height, frames=frames, steps=args.cache_steps)
    vae_config = VAE_CONFIGS["tiny" if args.tiny else "884-16c-hy"]
    vae = CausalVAE(vae_config).to(bench.device)
    random_init_(vae, torch.Generator(device=bench.device).manual_seed(0), scale=0.5)
    vae = vae.to(torch.float16 if bench.device.type == "cuda" else torch.float32).eval()
    reference = {}

    def run(preset, record):
        profile = bench.profile_for(args.cap_gb)
        schedule = plan(profile, width, height, frames, dit_config=bench.config, text_encoders=()).schedule
        bench._cap(args.cap_gb)
        bench.model.token_chunk = profile.token_chunk
        streamer = BlockStreamer(bench.model.all_blocks(), schedule, bench.device, keep_host_copy=True)
        cache = make_step_cache(bench.model, preset, request.steps, bench.device)
        try:
            bench._sync()
            began = time.perf_counter()
            latents = denoise(bench.model, embeddings, x.float(), request, bench.device, step_cache=cache,
                              blocks_for_step=lambda i: streamer.blocks_for_step(prefetch_next_step=i + 1 < request.steps))
            bench._sync()
            record["dit_s"] = time.perf_counter() - began
        finally:
            streamer.close()
        record["dit_forwards"] = len(cache.state.computed) if cache else request.steps
        tiled = TiledVAE(vae, profile.vae_spatial_tile, profile.vae_temporal_tile)
        frames_out = decode(vae, latents, bench.device, vae_decode=tiled.decode)
        record["peak_gb"] = torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.cuda else None
        if not reference:
            reference.update(latents=latents.cpu(), frames=frames_out)
            return
        record["rel_error"] = float((latents.cpu() - reference["latents"]).norm() / reference["latents"].norm())
        record["psnr_db"] = psnr(frames_out, reference["frames"])

    for preset in ("off", "safe", "fast"):
        base = {"size": key, "run": "step cache", "cap_gb": args.cap_gb, "attention": "sdpa", "compile": False,
                "fp8_matmul": "dequant", "cache": preset, "steps": request.steps}
        bench.guarded(base, "cache-" + key, lambda record, p=preset: run(p, record))


if __name__ == "__main__":
    raise SystemExit(main())
