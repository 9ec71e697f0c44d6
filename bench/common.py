"""Shared helpers for the GPU benchmarks: random-weight models built straight on the device,
device description, peak-memory capture and JSON output. Runs on CPU too (for the --tiny tests)."""

import json
import math
import platform
import time
from pathlib import Path

import torch

from hyvideo.config import DiTConfig
from hyvideo.dit import HunyuanVideoDiT


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory_gb=round(props.total_memory / 2**30, 2),
                    capability=f"{props.major}.{props.minor}")
    else:
        info["name"] = platform.processor() or "cpu"
    return info


@torch.no_grad()
def random_init_(module: torch.nn.Module, gen: torch.Generator, scale: float = 1.0) -> None:
    """Weights ~ N(0, scale^2 / fan_in), norm weights 1, biases 0: realistic activation scale
    without reading a checkpoint, drawn on the module's device."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, scale / math.sqrt(p[0].numel()), generator=gen)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()


def random_dit(config: DiTConfig, device, dtype=torch.bfloat16, seed: int = 0) -> HunyuanVideoDiT:
    """Build on meta, materialize on the device, fill with random weights."""
    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    model = model.to_empty(device=device).to(dtype)
    random_init_(model, torch.Generator(device=device).manual_seed(seed))
    return model.eval().requires_grad_(False)


def dit_inputs(config: DiTConfig, width: int, height: int, frames: int, device, dtype=torch.bfloat16, text_len: int = 256, valid: int = 120):
    latent = (1, config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(latent, generator=gen).to(device)
    text = torch.randn(1, text_len, config.text_states_dim, generator=gen).to(device, dtype)
    mask = torch.zeros(1, text_len, dtype=torch.long, device=device)
    mask[:, :valid] = 1
    pooled = torch.randn(1, config.text_states_dim_2, generator=gen).to(device, dtype)
    t = torch.tensor([900.0], device=device)
    guidance = torch.full((1,), 6016.0, device=device, dtype=dtype)
    return x, t, text, mask, pooled, guidance


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float | None:
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return None


def write_results(out_dir: Path, name: str, results: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = results["device"].get("name", "cpu").replace(" ", "-").replace("/", "-")
    path = out_dir / f"{name}-{slug}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def measure_forward(model, inputs, device, repeats: int, digits: int = 3) -> tuple[torch.Tensor, dict]:
    """One warm-up and `repeats` timed forwards; returns the last output and its timings and
    peak memory."""
    reset_peak(device)
    last = [None]

    def forward():
        last[0] = None  # free the previous output first
        last[0] = model(*inputs)

    with torch.inference_mode():
        times = timed(forward, device, 1 + repeats)
    stats = {"s_per_forward": round(min(times[1:]), digits), "all_s": [round(t, digits) for t in times],
             "peak_memory_gb": peak_gb(device)}
    return last[0], stats


def psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of uint8 frames against uint8 reference frames (inf when equal)."""
    mse = float((frames.float() - reference.float()).pow(2).mean())
    return math.inf if mse == 0 else round(10 * math.log10(255**2 / mse), 2)


def finish(out_dir: Path, name: str, results: dict) -> dict:
    """Print every run, save the JSON, say where."""
    for run in results["runs"]:
        print(run, flush=True)
    print(f"wrote {write_results(out_dir, name, results)}")
    return results
