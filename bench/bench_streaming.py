"""Benchmark: DiT block streaming vs all-resident vs diffusers group offloading (GPU), plus one
VAE tile's memory against the planner.

    python -m bench.bench_streaming --out bench/results            # 13B, GPU, ~8 minutes
    python -m bench.bench_streaming --tiny --out /tmp/bench         # tiny config, CPU, seconds

The 13B DiT gets random weights, quantized to FP8 on the GPU (quant/fp8.py: float8_e4m3fn weight +
per-channel float32 scale, dequantized per call). For each video size it runs `--steps` DiT forwards:
- resident: all 60 blocks on the GPU, no memory cap;
- stream@CAP: the shipped profile for CAP GiB (its planner schedule and token chunk) under
  torch.cuda.set_per_process_memory_fraction(CAP / total);
- diffusers@CAP (if diffusers imports): HunyuanVideoTransformer3DModel with the same random-weight
  layout, enable_layerwise_casting(float8_e4m3fn -> bf16) and apply_group_offloading(block_level,
  1 block per group, use_stream=True), under the same cap.
Recorded per run: seconds per step, peak VRAM (max_memory_allocated) against the planner's
prediction, bytes streamed per step, copy time and the time compute waited for copies.
Every run is guarded (an error or OOM is recorded and the next run starts); results are written to
OUT/bench_streaming-<device>.json and .md after every run. Runs that would not finish
within --budget-s are skipped and recorded as such.
"""

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from hyvideo.blocks import DoubleStreamBlock, SingleStreamBlock
from hyvideo.config import DIT_CONFIGS, VAE_CONFIGS, DiTConfig
from hyvideo.dit import HunyuanVideoDiT
from lowvram.activations import vae_decode_tile_bytes
from bench.memtrack import PeakTracker
from lowvram.planner import plan
from lowvram.profiles import Profile, profile_from_dict, shipped_profiles
from lowvram.schedule import plan_schedule
from lowvram.streaming import BlockStreamer, leaf_bytes
from bench.common import random_init_
from quant.fp8 import FP8Linear
from lowvram.units import GIB


def quantize_fp8_(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, FP8Linear.from_linear(child))
        else:
            quantize_fp8_(child)
    return module


def build_fp8_dit(config: DiTConfig, device: torch.device, seed: int = 0) -> HunyuanVideoDiT:
    """Random FP8 DiT: trunk (bf16) materialized on `device`; each block built, filled and quantized
    on `device` one at a time, then kept as a host master (the streamer decides what goes back)."""
    from lowvram.streaming import dit_trunk

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    for child in dit_trunk(model):
        child.to_empty(device=device)
        random_init_(child, gen, scale=0.5)
        child.to(torch.bfloat16)
    hidden, heads, mlp = config.hidden_size, config.heads, config.mlp_hidden
    for blocks, cls in ((model.double_blocks, DoubleStreamBlock), (model.single_blocks, SingleStreamBlock)):
        for i in range(len(blocks)):
            with torch.device("meta"):
                block = cls(hidden, heads, mlp)
            block.to_empty(device=device)
            random_init_(block, gen, scale=0.5)
            blocks[i] = quantize_fp8_(block.to(torch.bfloat16)).to("cpu")
            del block
    return model.eval().requires_grad_(False)


def make_inputs(config: DiTConfig, height: int, width: int, frames: int, device) -> tuple:
    gen = torch.Generator().manual_seed(1)
    t_lat, h_lat, w_lat = (frames - 1) // 4 + 1, height // 8, width // 8
    x = torch.randn(1, config.in_channels, t_lat, h_lat, w_lat, generator=gen)
    text = torch.randn(1, 256, config.text_states_dim, generator=gen)
    mask = torch.ones(1, 256, dtype=torch.long)  # all 256 text tokens valid: the worst case
    pooled = torch.randn(1, config.text_states_dim_2, generator=gen)
    tensors = (x, torch.tensor([900.0]), text, mask, pooled, torch.tensor([6016.0]))
    return tuple(t.to(device) for t in tensors)


class Recorder:
    def __init__(self, out_dir: Path, meta: dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = str(meta.get("device_name", "cpu")).replace(" ", "-").replace("/", "-")
        stem = f"bench_streaming-{'tiny-' if meta.get('config') == 'tiny' else ''}{slug}"
        self.json_path, self.md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        self.data = {"meta": meta, "results": []}
        self._write()

    def add(self, record: dict) -> None:
        self.data["results"].append(record)
        self._write()

    def _write(self) -> None:
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.json_path)
        self.md_path.write_text(markdown(self.data))


def _fmt(value, digits=2):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.1 or value == 0 or digits == 0 else f"{value:.3g}"
    return str(value)


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# DiT streaming benchmark ({meta.get('device_name')}, torch {meta.get('torch')})", "",
             "| size | run | cap GiB | resident | s/step (last) | s/step (all) | peak GiB | predicted GiB | "
             "streamed GiB/step | copy ms/step | wait ms/step | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        steps = r.get("step_s") or []
        lines.append("| " + " | ".join([
            r.get("size", ""), r.get("run", ""), _fmt(r.get("cap_gb"), 0), _fmt(r.get("resident_blocks")),
            _fmt(steps[-1] if steps else None), " / ".join(f"{s:.2f}" for s in steps), _fmt(r.get("peak_gb")),
            _fmt(r.get("predicted_gb")), _fmt(r.get("streamed_gb_per_step")), _fmt(r.get("copy_ms_per_step"), 0),
            _fmt(r.get("wait_ms_per_step"), 0), r.get("status", "ok") if not r.get("error") else "error: " + r["error"][:80],
        ]) + " |")
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, args, device: torch.device, recorder: Recorder):
        self.args, self.device, self.recorder = args, device, recorder
        self.cuda = device.type == "cuda"
        self.deadline = time.perf_counter() + args.budget_s
        self.estimates: dict[str, float] = {}  # size -> seconds of one run, from the first one
        self.model = None  # the FP8 DiT (host masters + trunk on the device)
        self.diffusers = None  # diffusers' transformer with group offloading, once built
        self.prepare = None  # called with each run's streamer before its steps (bench_speed: compile)
        self.last_output = None  # the last step's output of the last run, float32 on the host

    # -- helpers -----------------------------------------------------------------------------

    def _clean(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _cap(self, cap_gb) -> None:
        if self.cuda and cap_gb is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GIB / total), self.device)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def guarded(self, base: dict, size_key: str, fn) -> None:
        """Run fn(record) unless the time budget is too short for it; record errors."""
        record = dict(base)
        left = self.deadline - time.perf_counter()
        needed = self.estimates.get(size_key, 0.0)
        if left < needed * 1.1 or left <= 0:
            record.update(status=f"skipped: {left:.0f} s of budget left, about {needed:.0f} s needed")
            self.recorder.add(record)
            return
        began = time.perf_counter()
        try:
            fn(record)
        except Exception as error:  # keep going: one failed run must not lose the others
            record["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            record["traceback"] = traceback.format_exc(limit=4)
        finally:
            record["wall_s"] = time.perf_counter() - began
            self.estimates[size_key] = max(self.estimates.get(size_key, 0.0), record["wall_s"])
            try:
                self._clean()
            except Exception as error:
                record["clean_error"] = repr(error)
        self.recorder.add(record)

    def _steps(self, forward, record: dict) -> None:
        times, peaks = [], []
        for step in range(self.args.steps):
            tracker = None if self.cuda else PeakTracker()
            self._sync()
            began = time.perf_counter()
            with torch.no_grad():
                if tracker is None:
                    out = forward(step)
                else:
                    with tracker:
                        out = forward(step)
            self._sync()
            times.append(time.perf_counter() - began)
            peaks.append(tracker.peak_bytes if tracker else None)
            record["finite"] = bool(torch.isfinite(out).all())
            self.last_output = out.float().cpu()
            del out
        record["step_s"] = times
        record["peak_gb"] = (torch.cuda.max_memory_allocated(self.device) if self.cuda else max(peaks)) / GIB

    # -- runs --------------------------------------------------------------------------------

    def profile_for(self, cap_gb) -> Profile:
        shipped = [p for p in shipped_profiles() if p.vram_budget_gb <= (cap_gb or 1e9)] or shipped_profiles()[-1:]
        base = shipped[0].to_dict()
        base.update(vram_budget_gb=float(cap_gb or 1e6), name=f"{shipped[0].name}@{cap_gb}")
        if cap_gb is None:
            base.update(resident_blocks=len(self.model.all_blocks()), name="resident")
        return profile_from_dict(base)

    def run_ours(self, size, cap_gb, inputs, record) -> None:
        config = self.config
        height, width, frames = size
        profile = self.profile_for(cap_gb)
        p = plan(profile, width, height, frames, dit_config=config, text_encoders=())
        schedule = p.schedule
        if self.args.tiny:  # budgets in GiB mean nothing at tiny scale: cap 16 -> half resident
            n = len(schedule.kinds)
            resident = n if cap_gb is None or cap_gb >= 24 else n // 2
            schedule = plan_schedule(schedule.kinds, [leaf_bytes(b) for b in self.model.all_blocks()],
                                     prefetch_depth=profile.prefetch_depth, resident=resident)
        self._cap(cap_gb)
        self.model.token_chunk = profile.token_chunk
        streamer = BlockStreamer(self.model.all_blocks(), schedule, self.device, keep_host_copy=True,
                                 pinned_cap_bytes=profile.pinned_ram_cap_bytes if not self.args.no_pin_cap else None)
        try:
            if self.prepare is not None:
                self.prepare(streamer)
            steps = self.args.steps
            self._steps(lambda s: self.model(*inputs, blocks=streamer.blocks_for_step(prefetch_next_step=s + 1 < steps)), record)
            stats = streamer.step_stats()
        finally:
            streamer.close()
        dit = p.stages["dit"]
        record.update(
            resident_blocks=len(schedule.resident), streamed_blocks=len(schedule.streamed),
            prefetch_depth=schedule.prefetch_depth, token_chunk=profile.token_chunk,
            predicted_gb=(dit.vram_bytes if self.cuda else dit.parts["activations"]) / GIB,
            predicted_what="planner dit stage" if self.cuda else "planner dit activations (cpu: tensor bytes)",
            streamed_gb_per_step=stats[-1].bytes_copied / GIB if stats else 0.0,
            copy_ms_per_step=stats[-1].copy_ms if stats else 0.0,
            wait_ms_per_step=stats[-1].wait_ms if stats else 0.0,
            copy_gb_per_s=(stats[-1].bytes_copied / GIB) / (stats[-1].copy_ms / 1000) if stats and stats[-1].copy_ms else None,
            steps_stats=[s.__dict__ for s in stats], pinned_gb=streamer.pin_report.pinned_bytes / GIB,
            pin_note=streamer.pin_report.reason, schedule=str(schedule),
        )

    def run_diffusers(self, size, cap_gb, inputs, record) -> None:
        from diffusers.hooks import apply_group_offloading

        if self.diffusers is None:  # built and offloaded once, reused for every size and cap
            began = time.perf_counter()
            model = self.diffusers_model()
            apply_group_offloading(model, onload_device=self.device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=self.cuda)
            self.diffusers = model
            record["build_s"] = time.perf_counter() - began
            self._clean()  # the build's own peak (bf16 weights on the device) is not the forward's
        model = self.diffusers
        self._cap(cap_gb)
        x, t, text, mask, pooled, guidance = inputs
        self._steps(lambda s: model(x.to(torch.bfloat16), t, text.to(torch.bfloat16), mask, pooled.to(torch.bfloat16),
                                    guidance, return_dict=False)[0], record)
        record.update(offload="apply_group_offloading(block_level, 1 block/group, use_stream) + layerwise fp8 casting")

    def diffusers_model(self):
        from diffusers import HunyuanVideoTransformer3DModel

        c = self.config
        kwargs = dict(in_channels=c.in_channels, out_channels=c.out_channels, num_attention_heads=c.heads,
                      attention_head_dim=c.head_dim, num_layers=c.double_blocks, num_single_layers=c.single_blocks,
                      num_refiner_layers=c.refiner_blocks, mlp_ratio=c.mlp_ratio, patch_size=c.patch_size[1],
                      patch_size_t=c.patch_size[0], guidance_embeds=c.guidance_embed, text_embed_dim=c.text_states_dim,
                      pooled_projection_dim=c.text_states_dim_2, rope_theta=c.rope_theta, rope_axes_dim=c.rope_axes_dim)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # its note about float32 modules does not apply (there are none)
        with torch.device("meta"):
            model = HunyuanVideoTransformer3DModel(**kwargs)
        model.to(torch.bfloat16).to_empty(device=self.device)  # filled on the device, then cast and offloaded
        random_init_(model, torch.Generator(device=self.device).manual_seed(2), scale=0.5)
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        return model.to("cpu").eval()

    def run_vae_tile(self, record) -> None:
        config = VAE_CONFIGS["tiny" if self.args.tiny else "884-16c-hy"]
        from hyvideo.vae import CausalVAE

        shape = (5, 8, 8) if self.args.tiny else (17, 32, 32)
        dtype = torch.float32 if not self.cuda else torch.float16
        with torch.device("meta"):
            vae = CausalVAE(config)
        vae.to(dtype).to_empty(device=self.device)
        random_init_(vae, torch.Generator(device=self.device).manual_seed(3), scale=0.5)
        z = torch.randn(1, config.latent_channels, *shape, device=self.device, dtype=dtype)
        self._clean()
        base = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        tracker = None if self.cuda else PeakTracker()
        began = time.perf_counter()
        with torch.no_grad():
            if tracker:
                with tracker:
                    out = vae.decode(z)
            else:
                out = vae.decode(z)
        self._sync()
        peak = (torch.cuda.max_memory_allocated(self.device) - base) if self.cuda else tracker.peak_bytes
        record.update(step_s=[time.perf_counter() - began], peak_gb=peak / GIB, finite=bool(torch.isfinite(out).all()),
                      predicted_gb=vae_decode_tile_bytes(config, *shape, act_bytes=torch.finfo(dtype).bits // 8) / GIB,
                      predicted_what="planner vae tile activations", tile=list(shape))
        del vae, out, z


def diffusers_available() -> bool:
    try:
        import diffusers.hooks  # noqa: F401
        from diffusers import HunyuanVideoTransformer3DModel  # noqa: F401
    except Exception:
        return False
    return True


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for item in text.split(","):
        h, w, f = (int(v) for v in item.lower().split("x"))
        sizes.append((h, w, f))
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results", help="output folder (JSON + markdown)")
    parser.add_argument("--tiny", action="store_true", help="tiny config and sizes (CPU smoke run)")
    parser.add_argument("--sizes", default=None, help="HxWxF list, default 544x960x129,720x1280x129")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--caps", default="16,24", help="memory caps in GiB, most informative first")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting runs after this many seconds")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--runs", default="vae,resident,stream,diffusers",
                        help="which runs, of vae, resident, stream, diffusers (e.g. diffusers: only diffusers' offloading)")
    parser.add_argument("--no-pin-cap", action="store_true", help="pin all streamed blocks (ignore the profile cap)")
    args = parser.parse_args(argv)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    config = DIT_CONFIGS["tiny" if args.tiny else "HYVideo-T/2-cfgdistill"]
    sizes = parse_sizes(args.sizes or ("32x48x9" if args.tiny else "544x960x129,720x1280x129"))
    caps = [float(c) for c in args.caps.split(",") if c]
    runs = set(args.runs.split(","))
    use_diffusers = "diffusers" in runs and not args.no_diffusers and diffusers_available()
    meta = {"torch": torch.__version__, "device": str(device), "python": sys.version.split()[0],
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "total_gb": torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None,
            "config": "tiny" if args.tiny else "HYVideo-T/2-cfgdistill", "steps": args.steps, "diffusers": use_diffusers,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    recorder = Recorder(Path(args.out), meta)
    bench = Bench(args, device, recorder)
    bench.config = config

    if "vae" in runs:
        bench.guarded({"size": "tile", "run": "vae-decode-tile"}, "vae", bench.run_vae_tile)
    began = time.perf_counter()
    inputs = {size: make_inputs(config, *size, device=device) for size in sizes}
    names = {size: "x".join(map(str, size)) for size in sizes}
    if runs & {"resident", "stream"}:
        bench.model = build_fp8_dit(config, device)
        recorder.data["meta"]["build_s"] = time.perf_counter() - began
    for size in sizes:
        key = names[size]
        if "resident" in runs:
            bench.guarded({"size": key, "run": "resident", "cap_gb": None}, key,
                          lambda r, s=size: bench.run_ours(s, None, inputs[s], r))
        for cap in caps if "stream" in runs else ():
            bench.guarded({"size": key, "run": "stream", "cap_gb": cap}, key,
                          lambda r, s=size, c=cap: bench.run_ours(s, c, inputs[s], r))
    if use_diffusers:
        bench.model = None
        gc.collect()
        for cap in caps:
            for size in sizes:
                key = names[size]
                bench.guarded({"size": key, "run": "diffusers", "cap_gb": cap}, key,
                              lambda r, s=size, c=cap: bench.run_diffusers(s, c, inputs[s], r))
    recorder.data["meta"]["total_s"] = time.perf_counter() - began
    recorder.add({"size": "", "run": "done", "status": f"finished in {time.perf_counter() - began:.0f} s"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
