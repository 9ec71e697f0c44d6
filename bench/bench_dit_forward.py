"""One forward of the 13B DiT (random bf16 weights, all resident) at 544x960x129 and, if the card
holds it, 720x1280x129: seconds per forward and peak memory, per attention backend.

    PYTHONPATH=. python bench/bench_dit_forward.py              # GPU, full config
    PYTHONPATH=. python bench/bench_dit_forward.py --tiny       # CPU smoke run (tests)
"""

import argparse
from pathlib import Path

import torch

from bench.common import device_info, dit_inputs, finish, measure_forward, random_dit
from hyvideo.attention import installed
from hyvideo.config import DIT_CONFIGS

FULL_SIZES = [(960, 544, 129), (1280, 720, 129)]
TINY_SIZES = [(64, 48, 9)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--token-chunk", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    config = DIT_CONFIGS["tiny" if args.tiny else "HYVideo-T/2-cfgdistill"]
    dtype = torch.float32 if args.tiny else torch.bfloat16
    results = {"benchmark": "dit_forward", "device": device_info(device), "dtype": str(dtype),
               "token_chunk": args.token_chunk, "runs": []}
    model = random_dit(config, device, dtype)
    model.token_chunk = args.token_chunk
    results["weights_gb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3)
    backends = ["sdpa"] + [b for b in ("flash", "sage") if installed(b) and device.type == "cuda"]
    for width, height, frames in TINY_SIZES if args.tiny else FULL_SIZES:
        for backend in backends:
            model.attention_backend = backend
            run = {"size": f"{width}x{height}x{frames}", "backend": backend}
            try:
                inputs = dit_inputs(config, width, height, frames, device, dtype, text_len=256 if not args.tiny else 16, valid=120 if not args.tiny else 9)
                _, stats = measure_forward(model, inputs, device, args.repeats)
                run.update(stats, tokens=inputs[0].shape[2] * inputs[0].shape[3] * inputs[0].shape[4] // 4)
            except torch.OutOfMemoryError as err:
                run["error"] = f"out of memory: {str(err).splitlines()[0]}"
            results["runs"].append(run)
    return finish(args.out, "dit_forward" + ("-tiny" if args.tiny else ""), results)


if __name__ == "__main__":
    main()
