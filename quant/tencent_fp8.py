"""Tencent's pre-quantized FP8 DiT release (facts §1.13, §1.14), loaded straight into FP8Linears.

Files (in `ckpts/hunyuan-video-t2v-720p/transformers/`):
- `mp_rank_00_model_states_fp8.pt`: {"module": state dict} with the bf16 file's key names; the
  weights of the 320 block linears are float8_e4m3fn, everything else is in the model dtype;
- `mp_rank_00_model_states_fp8_map.pt`: {module path without ".weight": scale}, one scale per
  layer (a scalar or a [1] tensor), with W ~= W_fp8.to(bf16) * scale.

The model is built on the meta device, its block linears swapped for per-tensor FP8Linears, and the
memory-mapped file assigned into it (`torch.load(mmap=True)` + `load_state_dict(assign=True)`): no
bf16 copy of the 12.5 B quantized weights ever exists, and weights are paged in only when used.
`write_tencent_fp8_pair` writes a file pair in exactly this format from any state dict (tests).
"""

from pathlib import Path

import torch

from hyvideo.checkpoint import check_state_dict
from hyvideo.config import DiTConfig
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from hyvideo.weight_io import read_torch_file

from .fp8 import FP8_DTYPE, quantize_fp8, swap_linears_fp8
from .policy import POLICIES

TENCENT_POLICY = POLICIES["blocks"]  # every nn.Linear under double_blocks / single_blocks


def map_path_for(weights_path: str | Path) -> Path:
    """The official naming: "<name>.pt" -> "<name>_map.pt"."""
    path = Path(weights_path)
    return path.with_name(path.stem + "_map.pt")


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise HyVideoError(f"{what} not found: {path}. Download the HunyuanVideo FP8 checkpoint pair into that folder.")
    return read_torch_file(path)  # read-only mmap, weights-only, unwraps "module" / "ema"


def tencent_fp8_state_dict(weights_path: str | Path, map_path: str | Path | None, config: DiTConfig,
                           dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The file pair as our FP8 state dict: fp8 weights untouched (memory-mapped), each layer's
    scale as a float32 [1, 1] "<layer>.scale", every other tensor in `dtype`."""
    weights_path = Path(weights_path)
    map_path = map_path_for(weights_path) if map_path is None else Path(map_path)
    state = _read(weights_path, "FP8 DiT weights")
    scales = _read(map_path, "FP8 scale map")

    quantized = set(TENCENT_POLICY.module_names(config))
    out = {}
    for key, tensor in state.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in quantized:
            if tensor.dtype != FP8_DTYPE:
                raise HyVideoError(
                    f"{weights_path} stores {key} as {tensor.dtype}, not float8_e4m3fn: it is not Tencent's FP8 "
                    "checkpoint (load the bf16 file without the FP8 loader, or quantize it with the fp8 scheme)"
                )
            if module not in scales:
                raise HyVideoError(f"{map_path} has no scale for {module}: the map does not belong to {weights_path.name}")
            scale = scales[module]
            if scale.numel() != 1:
                raise HyVideoError(f"{map_path}: the scale of {module} has shape {list(scale.shape)}, expected one value")
            out[key] = tensor
            out[module + ".scale"] = scale.detach().to(torch.float32).reshape(1, 1)
        else:
            out[key] = tensor.to(dtype)
    return out


def load_tencent_fp8(weights_path: str | Path, config: DiTConfig, map_path: str | Path | None = None,
                     dtype: torch.dtype = torch.bfloat16, device: "torch.device | str" = "cpu") -> HunyuanVideoDiT:
    """HunyuanVideoDiT with per-tensor FP8Linears filled from Tencent's file pair (strict keys).

    On `device="cpu"` the tensors stay memory-mapped (a block streamer copies them to the GPU as
    needed); another device moves the whole model there."""
    state = tencent_fp8_state_dict(weights_path, map_path, config, dtype)
    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    swap_linears_fp8(model, TENCENT_POLICY, per_channel=False)
    check_state_dict(model, state, weights_path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().to(device)


def write_tencent_fp8_pair(state_dict: dict[str, torch.Tensor], weights_path: str | Path, config: DiTConfig,
                           dtype: torch.dtype = torch.bfloat16, scalar_scales: bool = True) -> tuple[Path, Path]:
    """Write `state_dict` (a bf16/float32 DiT state dict) as an official-format FP8 pair.

    Block linear weights get one per-tensor scale (amax / 448, the official helper's rule);
    everything else is stored in `dtype`. `scalar_scales=False` stores the scales as [1] tensors
    (the official shape is unconfirmed, facts §8; the loader accepts both)."""
    weights_path = Path(weights_path)
    quantized = set(TENCENT_POLICY.module_names(config))
    module_state, scales = {}, {}
    for key, tensor in state_dict.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in quantized:
            w_fp8, scale = quantize_fp8(tensor, per_channel=False)
            module_state[key] = w_fp8
            scales[module] = scale.reshape(()) if scalar_scales else scale.reshape(1)
        else:
            module_state[key] = tensor.detach().to(dtype).clone()
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    map_path = map_path_for(weights_path)
    torch.save({"module": module_state}, weights_path)
    torch.save(scales, map_path)
    return weights_path, map_path
