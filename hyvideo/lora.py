"""LoRA for the DiT: the files in circulation read onto our module names, and the linears they
touch swapped for `LoraLinear` (gpt-fast style module swapping; img_in's patch convolution for
`LoraPatchConv`). The base layer is wrapped, never changed, so bf16, FP8 and INT8 weights all take
a LoRA without being re-quantized, and another LoRA or strength is only another wrapping of
freshly loaded weights.

Both model families take LoRAs: the 13B HunyuanVideo (T2V and I2V) and HunyuanVideo-1.5, whose
official checkpoint (and musubi-tuner's 1.5 LoRAs) name each block's q, k, v apart (`img_attn_q`):
those are row thirds of our fused `img_attn_qkv`, as diffusers' to_q, to_k, to_v are.

Formats (a file may mix them; keys may carry a `transformer.` or `diffusion_model.` prefix):
- diffusers / PEFT: `transformer_blocks.0.attn.to_q.lora_A.weight` / `.lora_B.weight` in diffusers'
  module names; alpha from the file's `lora_adapter_metadata` (what diffusers saves), else the rank.
- kohya / musubi-tuner: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight`
  / `.alpha`: the official module names with dots written as underscores.
- Tencent's HunyuanVideo-I2V LoRA training (`train_image2video_lora.py`, its released
  `*_kohaya_weights.safetensors`): kohya's layout with the prefix `Hunyuan_video_I2V_lora_` instead
  of `lora_unet_`, alpha = rank (Tencent's loader ignores alpha; alpha / rank = 1 here too).
- official names: `double_blocks.0.img_attn_qkv.lora_A.weight` (or lora_down / lora_up, `.alpha`).
img_in's patch convolution (kernel = stride: a linear on each patch) takes a LoRA whose factors are
convolutions, as PEFT and kohya store them: down [r, C, 1, 2, 2], up [out, r, 1, 1, 1]. Its input
channels are the DiT's (16; 33 for latent_concat I2V), so a LoRA made for the other width is refused.
Anything else (a key naming no linear, a shape that does not fit, DoRA or bias tensors, a file with
no LoRA tensors) is one HyVideoError listing the first offenders: nothing is silently ignored.

A LoRA adds scale * up @ down to a weight W [out, in] (down [r, in], up [out, r], scale =
strength * alpha / r, or alpha / sqrt(r) for rsLoRA). Our linears are the official fused ones, so a
diffusers LoRA on to_q, to_k, to_v updates three row slices of img_attn_qkv. All updates of one
linear (its slices, every LoRA file) make one exact low-rank update: down = the parts' downs
stacked [R, in], up [out, R] holding each part's scaled up in its rows and rank columns, zeros
elsewhere (R = the sum of the ranks). For separate q/k/v parts the zeros cost 3x (qkv) or 4x
(single-block linear1) the up-projection's bytes and FLOPs of keeping the parts apart; in exchange
the forward is one line and row slices (`linear_rows`) are slices of `up`.

Every block of a kind gets the same structure (the same linears wrapped, zero-padded to the widest
rank), so the streamer's blocks of a kind keep one leaf signature and share one ring.
"""

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import linear_rows
from .config import DiTConfig
from .diffusers_keys import SWAPPED_HALVES, diffusers_parts, part_sizes, swap_halves
from .errors import HyVideoError
from .models import dit_class
from .v15_config import V15DiTConfig
from .v15_keys import FUSED_QKV, SWAPPED_FINAL, diffusers_modules
from .weight_io import read_safetensors

KOHYA_PREFIXES = ("lora_unet_", "Hunyuan_video_I2V_lora_")  # kohya/musubi-tuner, Tencent's I2V training
_PREFIXES = ("transformer.", "diffusion_model.")
_ROLES = {"lora_A.weight": "down", "lora_A.default.weight": "down", "lora_down.weight": "down",
          "lora_B.weight": "up", "lora_B.default.weight": "up", "lora_up.weight": "up", "alpha": "alpha"}
_STRENGTH = re.compile(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
_BLOCK = re.compile(r"(double_blocks|single_blocks)\.\d+\.(.+)")
PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig default, what diffusers uses when metadata omits lora_alpha


def is_lora(keys) -> bool:
    """Whether a state dict's names are a LoRA's: an adapter's down or up weight in any format above."""
    suffixes = tuple(f".{suffix}" for suffix, role in _ROLES.items() if role != "alpha")
    return any(key.endswith(suffixes) for key in keys)


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:STRENGTH]`."""

    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """Only a trailing `:number` is a strength, so a path may contain ':' itself."""
        match = _STRENGTH.fullmatch(text)
        return cls(Path(match[1]), float(match[2])) if match else cls(Path(text))


class LoraLinear(nn.Module):
    """base(x) + (x @ down.T) @ up.T, with the scale already in `up`.

    down [R, in] and up [out, R] are buffers in the compute dtype: ordinary tensor leaves that move,
    pin and stream with the block like the base layer's own."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = down.shape[1], up.shape[0]
        self.register_buffer("down", down)
        self.register_buffer("up", up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rows(x, slice(None))

    def forward_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Output features `rows` only (what `hyvideo.blocks.linear_rows` asks for)."""
        # added in place: one output-sized temporary (the LoRA's), not two
        return linear_rows(self.base, x, rows).add_(F.linear(F.linear(x, self.down), self.up[rows]))

    # `hyvideo.blocks.held_weights`: an FP8 base dequantizes once per block, as it does unwrapped.
    def hold_weight(self) -> None:
        if hasattr(self.base, "hold_weight"):
            self.base.hold_weight()

    def release_weight(self) -> None:
        if hasattr(self.base, "release_weight"):
            self.base.release_weight()


class LoraPatchConv(nn.Module):
    """base(x) + up(down(x)) for a patch-embedding Conv3d (img_in): down is a conv with the base's
    kernel and stride [R, C, kt, kh, kw], up a 1x1x1 conv [out, R, 1, 1, 1] with the scale in it."""

    def __init__(self, base: nn.Conv3d, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("down", down.reshape(down.shape[0], *base.weight.shape[1:]))
        self.register_buffer("up", up[:, :, None, None, None])

    @property
    def weight(self) -> torch.Tensor:  # the DiT reads its compute dtype from img_in's weight
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] -> [B, out, T, H/2, W/2]
        return self.base(x).add_(F.conv3d(F.conv3d(x, self.down, stride=self.base.stride), self.up))


# --- reading files onto our module names ------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    module: str  # our (official) linear
    rows: slice  # the output rows the named module is
    swap: bool  # diffusers' final modulation: (shift, scale) halves swapped


@dataclass
class _Part:
    target: _Target
    down: torch.Tensor  # [r, in], memory-mapped until used
    up: torch.Tensor  # [rows, r]
    scale: float  # strength * alpha / r


def linear_shapes(config: DiTConfig | V15DiTConfig) -> dict[str, tuple[int, ...]]:
    """Weight shape of every module a LoRA may touch, by module name (meta device: nothing
    allocated): each linear's (out, in), and img_in's patch convolution (out, C, kt, kh, kw)."""
    with torch.device("meta"):
        model = dit_class(config)(config)
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if type(m) is nn.Linear}
    shapes["img_in.proj"] = tuple(model.img_in.proj.weight.shape)
    return shapes


def _targets(shapes: dict[str, tuple[int, ...]], config: DiTConfig | V15DiTConfig) -> dict[str, _Target]:
    """Every module name a LoRA file may use for (a row slice of) one of our linears."""
    found = {}
    for module, (out, *_) in shapes.items():
        official = {module: _Target(module, slice(0, out), False)}
        if isinstance(config, V15DiTConfig) and FUSED_QKV.fullmatch(module):  # official 1.5: q, k, v apart
            official |= {module[:-3] + part: _Target(module, slice(i * out // 3, (i + 1) * out // 3), False)
                         for i, part in enumerate("qkv")}
        for name, target in official.items():
            found[name] = target
            found.update({prefix + name.replace(".", "_"): target for prefix in KOHYA_PREFIXES})
        for name, target in _diffusers_names(module, out, config):
            found[name] = target
    return found


def _diffusers_names(module: str, out: int, config: DiTConfig | V15DiTConfig) -> list[tuple[str, _Target]]:
    """diffusers' module names for our `module` (several for a fused linear: its row slices)."""
    if isinstance(config, V15DiTConfig):
        theirs = diffusers_modules(config.double_blocks, config.refiner_blocks).get(module, ())
        names, swap = [theirs] if isinstance(theirs, str) else list(theirs), module == SWAPPED_FINAL
        sizes = [out // max(len(names), 1)] * len(names)  # a fused qkv: three equal parts
    else:
        names, swap = [part.removesuffix(".weight") for part in diffusers_parts(f"{module}.weight")], module.startswith(SWAPPED_HALVES)
        sizes = part_sizes(len(names), out, config.hidden_size)
    found, start = [], 0
    for name, size in zip(names, sizes):
        found.append((name, _Target(module, slice(start, start + size), swap)))
        start += size
    return found


def _split_key(key: str, targets: dict[str, _Target]) -> tuple[str | None, str | None]:
    """(module name as in `targets`, role) of a file's key; None for what is not understood."""
    for suffix, role in _ROLES.items():
        if key.endswith(f".{suffix}"):
            source = key.removesuffix(f".{suffix}")
            names = [source] + [source.removeprefix(p) for p in _PREFIXES if source.startswith(p)]
            return next((name for name in names if name in targets), None), role
    return None, None


def _adapter_config(path: Path) -> dict | None:
    """The PEFT LoraConfig diffusers stores in the safetensors metadata, if any (keys possibly under
    the pipeline's `transformer.` prefix)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        raise HyVideoError(f"LoRA {path}: its lora_adapter_metadata is not JSON; the file is damaged") from None
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or config


def _alpha(config: dict | None, name: str, rank: int) -> float:
    """alpha of module `name` per a PEFT config (alpha_pattern matched as peft does), else the rank."""
    if config is None:
        return rank
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return alpha
    return config.get("lora_alpha", PEFT_DEFAULT_ALPHA)


def _read_parts(spec: LoraSpec, targets: dict[str, _Target], shapes: dict[str, tuple[int, ...]]) -> list[_Part]:
    path = Path(spec.path)
    if not path.is_file():
        raise HyVideoError(f"LoRA file {path} does not exist (--lora PATH[:STRENGTH])")
    tensors = read_safetensors([path])  # memory-mapped; a file that is not safetensors -> HyVideoError
    config = _adapter_config(path)
    if config is not None and config.get("use_dora"):
        raise HyVideoError(f"LoRA {path} is a DoRA adapter, which is not supported; use a plain LoRA")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        name, role = _split_key(key, targets)
        if name is None:
            problems.append(f"{key} ({'names no linear of this model' if role else 'not a LoRA tensor'})")
        else:
            groups.setdefault(name, {})[role] = tensor
    parts = []
    for name, group in groups.items():
        if "down" not in group or "up" not in group:
            problems.append(f"{name} (lora_{'A/down' if 'down' not in group else 'B/up'} is missing)")
            continue
        target, down, up = targets[name], group["down"], group["up"]
        rows, weight = target.rows.stop - target.rows.start, shapes[target.module]
        rank, kernel = down.shape[0], (1,) * (len(weight) - 2)  # a conv's up is 1x1x1
        if len(weight) > 2 and down.ndim == len(weight) and down.shape[1] != weight[1]:
            problems.append(f"{name} (made for a DiT with {down.shape[1]} input channels; this one has {weight[1]})")
            continue
        if tuple(down.shape) != (rank, *weight[1:]) or tuple(up.shape) != (rows, rank, *kernel):
            shape = ", ".join(map(str, (rows, *weight[1:])))
            problems.append(f"{name} (down {tuple(down.shape)}, up {tuple(up.shape)} do not fit its [{shape}] weight)")
            continue
        down, up = down.flatten(1), up.flatten(1)  # a conv's factors as the linear on each patch
        alpha = float(group["alpha"]) if "alpha" in group else _alpha(config, name, rank)
        divisor = math.sqrt(rank) if config is not None and config.get("use_rslora") else rank
        parts.append(_Part(target, down, up, spec.strength * alpha / divisor))
    if problems or not parts:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise HyVideoError(
            f"LoRA {path} does not fit this model: " + (f"{len(problems)} key(s) not understood: {shown}" if problems else
            "it holds no LoRA tensors") + ". Is it a LoRA for this model (HunyuanVideo T2V or I2V, or HunyuanVideo-1.5) in "
            "the diffusers, kohya/musubi, Tencent or official format?"
        )
    return parts


def _ranks(parts: list[_Part], config: DiTConfig | V15DiTConfig) -> dict[str, int]:
    """Total rank R per wrapped linear; every block of a kind gets the same linears and ranks."""
    ranks: dict[str, int] = {}
    for part in parts:
        ranks[part.target.module] = ranks.get(part.target.module, 0) + part.down.shape[0]
    widest: dict[tuple[str, str], int] = {}
    for module, rank in ranks.items():
        match = _BLOCK.fullmatch(module)
        if match:
            widest[match.groups()] = max(widest.get(match.groups(), 0), rank)
    counts = {"double_blocks": config.double_blocks, "single_blocks": getattr(config, "single_blocks", 0)}  # 1.5: none
    for (blocks, rest), rank in widest.items():
        ranks.update({f"{blocks}.{i}.{rest}": rank for i in range(counts[blocks])})
    return ranks


def _layout(specs: list[LoraSpec], config: DiTConfig | V15DiTConfig):
    shapes = linear_shapes(config)
    targets = _targets(shapes, config)
    parts = [part for spec in specs for part in _read_parts(spec, targets, shapes)]
    return shapes, parts, _ranks(parts, config)


def lora_updates(specs: list[LoraSpec], config: DiTConfig | V15DiTConfig) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(our linear, down [R, in], up [out, R] with the scales in it) in float32, for all `specs`
    together (their updates add); one linear at a time, so float32 copies never pile up. img_in's
    patch convolution is the linear on each patch: in = C * kt * kh * kw."""
    shapes, parts, ranks = _layout(specs, config)
    by_module: dict[str, list[_Part]] = {}
    for part in parts:
        by_module.setdefault(part.target.module, []).append(part)
    for module, rank in ranks.items():
        (out_features, *weight_in), start = shapes[module], 0
        in_features = math.prod(weight_in)
        down, up = torch.zeros(rank, in_features), torch.zeros(out_features, rank)
        for part in by_module.get(module, []):  # none: a block padded to its kind's structure
            width = part.down.shape[0]
            part_up = part.up.float() * part.scale
            down[start : start + width] = part.down.float()
            up[part.target.rows, start : start + width] = swap_halves(part_up) if part.target.swap else part_up
            start += width
        yield module, down, up


@dataclass(frozen=True)
class LoraBytes:
    """What the LoRA tensors add (compute dtype): per double block, per single block, outside the blocks."""

    double_block: int = 0
    single_block: int = 0
    trunk: int = 0

    def block(self, kind: str) -> int:
        return self.double_block if kind == "double" else self.single_block

    def total(self, config: DiTConfig | V15DiTConfig) -> int:
        return config.double_blocks * self.double_block + getattr(config, "single_blocks", 0) * self.single_block + self.trunk


def lora_bytes(specs: list[LoraSpec], config: DiTConfig | V15DiTConfig, dtype_bytes: int = 2) -> LoraBytes:
    """LoraBytes of `specs` from the files' headers (and alphas): checks every key, reads no weights."""
    if not specs:
        return LoraBytes()
    shapes, _, ranks = _layout(specs, config)
    sizes = {"double_blocks": 0, "single_blocks": 0, "trunk": 0}
    for module, rank in ranks.items():
        match = _BLOCK.fullmatch(module)
        if match and not module.startswith(f"{match[1]}.0."):
            continue  # every block of a kind is alike: count block 0
        out_features, *weight_in = shapes[module]
        sizes[match[1] if match else "trunk"] += rank * (out_features + math.prod(weight_in)) * dtype_bytes
    return LoraBytes(sizes["double_blocks"], sizes["single_blocks"], sizes["trunk"])


def apply_loras(model: nn.Module, specs: list[LoraSpec]) -> dict:
    """Wrap the linears `specs` touch in `LoraLinear` (in place), in the model's compute dtype.
    Returns what was done, for the run's record."""
    dtype, done = model.compute_dtype, {"linears": 0, "bytes": 0}
    for name, down, up in lora_updates(specs, model.config):
        base = model.get_submodule(name)
        wrapper = LoraPatchConv if isinstance(base, nn.Conv3d) else LoraLinear
        model.set_submodule(name, wrapper(base, down.to(dtype), up.to(dtype)))
        done["linears"] += 1
        done["bytes"] += (down.numel() + up.numel()) * dtype.itemsize
    return done
