"""13B DiT with random weights, one forward at 544x960x33: bf16 vs FP8 (dequant) vs FP8
`_scaled_mm` vs INT8 (quanto). Seconds per forward, peak memory, relative error vs bf16.

    PYTHONPATH=. python bench/bench_quant.py           # GPU, full config
    PYTHONPATH=. python bench/bench_quant.py --tiny    # CPU smoke run (tests)
"""

import argparse
from pathlib import Path

import torch

from bench.common import device_info, dit_inputs, finish, measure_forward, random_dit
from hyvideo.config import DIT_CONFIGS
from hyvideo.errors import HyVideoError
from quant.fp8 import scaled_mm_supported, set_scaled_mm, swap_linears_fp8
from quant.int8 import quantize_int8


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm())


def weight_gb(model) -> float:
    return round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30, 3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    config = DIT_CONFIGS["tiny" if args.tiny else "HYVideo-T/2-cfgdistill"]
    dtype = torch.bfloat16
    width, height, frames = (64, 48, 9) if args.tiny else (960, 544, 33)
    inputs = dit_inputs(config, width, height, frames, device, dtype, text_len=16 if args.tiny else 256, valid=9 if args.tiny else 120)
    results = {"benchmark": "quant_forward", "device": device_info(device), "size": f"{width}x{height}x{frames}", "runs": []}

    def measure(name, model):
        out, stats = measure_forward(model, inputs, device, args.repeats, digits=4)
        run = {"scheme": name, **stats, "weights_gb": weight_gb(model)}
        results["runs"].append(run)
        return out, run

    model = random_dit(config, device, dtype, seed=0)
    reference, _ = measure("bf16", model)
    swap_linears_fp8(model)
    out, run = measure("fp8-dequant", model)
    run["rel_error_vs_bf16"] = relative_error(out, reference)
    if scaled_mm_supported(device):
        set_scaled_mm(model, True, device)
        out, run = measure("fp8-scaled-mm", model)
        run["rel_error_vs_bf16"] = relative_error(out, reference)
    else:
        results["runs"].append({"scheme": "fp8-scaled-mm", "skipped": f"needs CUDA cc >= 8.9, have {device}"})
    del model
    try:
        model = random_dit(config, device, dtype, seed=0)  # same weights again
        quantize_int8(model)
        out, run = measure("int8-quanto", model)
        run["rel_error_vs_bf16"] = relative_error(out, reference)
    except HyVideoError as err:
        results["runs"].append({"scheme": "int8-quanto", "skipped": str(err)})
    return finish(args.out, "quant_forward" + ("-tiny" if args.tiny else ""), results)


if __name__ == "__main__":
    main()
