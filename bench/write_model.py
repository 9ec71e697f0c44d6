"""Write `lowvram bench`'s random-weight model folder, alone, as fast as this machine allows.

    python -m bench.write_model --scratch /tmp/lowvram-bench --size full --layout official-fp8

The folder `lowvram bench --scratch S --model-size SIZE --layout LAYOUT` reads (written once:
`lowvram.generation.bench.ensure_synthetic_model`), with the weights drawn on the GPU when there is
one. bench/run_gpu.sh runs this as its own step so that no bench's time limit has to cover a
30 GB write. Prints one JSON line: folder, GB written, seconds, GB/s. `--size full-1.5-720p_t2v`
(SIZE-1.5-VARIANT, with `--layout diffusers`): the HunyuanVideo-1.5 folder `lowvram bench --model
1.5-VARIANT` reads.
"""

import argparse
import json
import time

import torch

from lowvram.generation.bench import V15_MODELS, ensure_synthetic_model, synthetic_plan
from lowvram.progress import Reporter

SIZES = ("full", "tiny", "full-i2v", "tiny-i2v", *(f"{size}-{model}" for size in ("full", "tiny") for model in V15_MODELS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--size", default="full", choices=SIZES)  # -i2v: token_replace
    parser.add_argument("--layout", default="official-fp8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    total = sum(f.nbytes for f in synthetic_plan(args.size, args.layout).weights)
    began = time.perf_counter()
    folder = ensure_synthetic_model(args.scratch, args.size, args.layout, Reporter(), args.device)
    seconds = time.perf_counter() - began
    print(json.dumps({"folder": str(folder), "gb": round(total / 1e9, 2), "seconds": round(seconds, 1),
                      "gb_per_s": round(total / 1e9 / seconds, 2) if seconds > 1 else None, "device": args.device}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
