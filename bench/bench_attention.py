"""Each attention kernel at a video's size: one joint attention call, and what it makes per DiT step.

    python -m bench.bench_attention --out bench/results                    # GPU: 720x1280x129, the 13B heads
    python -m bench.bench_attention --out /tmp/bench --size 96x128x17 --tiny # CPU smoke run

Attention is most of a 720p step (~77 % of the FLOPs), so a kernel's time on one call at the
video's joint sequence (image tokens + 256 text tokens, the worst case: batch 1 drops the padding)
x 60 blocks is most of what it changes per step. Per kernel that `--attention auto` considers
(lowvram/attention_choice.py) plus PyTorch's default SDPA: the probe first (4096 tokens, the
model's heads, error vs float32; a kernel that fails it is recorded and not timed), then
`--repeats` timed calls at the full size after one warm-up, each on its own copy of k (SageAttention
overwrites k). The whole-step figures, with streaming and everything else, come from
`lowvram bench` (bench/run_gpu.sh). Writes OUT/bench_attention-<device>.{json,md} after every kernel.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from hyvideo.attention import attention
from hyvideo.config import DIT_CONFIGS
from lowvram.activations import TEXT_TOKENS
from lowvram.attention_choice import candidates, probe
from lowvram.planner import plan
from lowvram.profiles import load_profile


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# Attention kernels at {meta['size']} ({meta['device_name']}, torch {meta['torch']})", "",
             f"One joint attention call: {meta['tokens']} tokens, {meta['heads']} heads x {meta['head_dim']}, bf16; "
             f"x {meta['blocks']} blocks per DiT step.", "",
             "| kernel | probe ms (4096 tokens) | ms per call | attention s per step | status |", "|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['kernel']} | {r.get('probe_ms') or ''} | {r.get('ms') or ''} | {r.get('s_per_step') or ''} | "
                     f"{r.get('status', 'ok')} |")
    return "\n".join(lines) + "\n"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--size", default="720x1280x129", help="HxWxF of the video")
    parser.add_argument("--tiny", action="store_true", help="the tiny model's heads (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    config = DIT_CONFIGS["tiny" if args.tiny else "HYVideo-T/2-cfgdistill"]
    height, width, frames = (int(v) for v in args.size.lower().split("x"))
    tokens = plan(load_profile("16gb"), width, height, frames, dit_config=config, text_encoders=()).tokens + TEXT_TOKENS
    blocks = config.double_blocks + config.single_blocks
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"torch": torch.__version__, "device_name": name, "size": args.size, "tokens": tokens, "heads": config.heads,
            "head_dim": config.head_dim, "blocks": blocks, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_attention-{'tiny-' if args.tiny else ''}{name.replace(' ', '-')}"
    data = {"meta": meta, "results": []}

    def save(record: dict) -> None:
        data["results"].append(record)
        stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
        stem.with_suffix(".md").write_text(markdown(data))

    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, tokens, config.heads, config.head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    kernels = ["sdpa", *candidates("auto")] if device.type == "cuda" else ["sdpa", "sdpa:flash", "sdpa:math"]
    for kernel in kernels:
        record = {"kernel": kernel}
        ms, why = probe(kernel, device, heads=config.heads, head_dim=config.head_dim)
        record["probe_ms"] = None if ms is None else round(ms, 3)
        if ms is None:
            save({**record, "status": f"not timed: {why}"})
            continue
        try:
            keys = [k.clone() for _ in range(args.repeats + 1)]
            with torch.inference_mode():
                attention(q, keys.pop(), v, backend=kernel)  # warm-up (kernel selection, autotuning)
                sync(device)
                began = time.perf_counter()
                for copy in keys:
                    attention(q, copy, v, backend=kernel)
                sync(device)
            call_ms = (time.perf_counter() - began) * 1000 / args.repeats
            record.update(ms=round(call_ms, 2), s_per_step=round(call_ms * blocks / 1000, 2))
        except Exception as error:  # out of memory, no kernel for this shape: recorded, the next kernel runs
            record["status"] = f"error: {type(error).__name__}: {' '.join(str(error).split())[:160]}"
        del keys
        save(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
