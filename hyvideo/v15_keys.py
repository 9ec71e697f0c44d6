"""HunyuanVideo-1.5 state-dict layouts (DiT and VAE): ours, Tencent's official checkpoint, diffusers'.

DiT: ours equals the official layout except that each double block's q, k, v projections are one
`*_attn_qkv` linear (official: `*_attn_q`, `*_attn_k`, `*_attn_v`). diffusers renames every module
(table below, from its `convert_hunyuan_video1_5_to_diffusers.py`), splits the refiner's fused qkv
too, and stores the final modulation as (scale, shift) where official stores (shift, scale).

VAE: ours is the official layout; diffusers renames modules only (bottom of this file).

Each function maps a whole state dict; it only renames, concatenates or splits tensors, so it also
works on meta tensors (for planning) and per block (for streaming: pass one block's keys).
"""

import re

import torch

_OFFICIAL_SPLIT = re.compile(r"(double_blocks\.\d+\.(?:img|txt)_attn_)([qkv])\.(weight|bias)")
FUSED_QKV = re.compile(r"double_blocks\.\d+\.(?:img|txt)_attn_qkv")  # our modules the official checkpoint stores as q, k, v
SWAPPED_FINAL = "final_layer.adaLN_modulation.1"  # diffusers stores its halves swapped


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = _OFFICIAL_SPLIT.fullmatch(key)
        if match is None:
            out[key] = value
        elif match[2] == "q":
            prefix, param = match[1], match[3]
            out[f"{prefix}qkv.{param}"] = torch.cat([state[f"{prefix}{part}.{param}"] for part in "qkv"])
    return out


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(double_blocks\.\d+\.(?:img|txt)_attn_)qkv\.(weight|bias)", key)
        if match is None:
            out[key] = value
        else:
            for part, piece in zip("qkv", value.chunk(3)):
                out[f"{match[1]}{part}.{match[2]}"] = piece
    return out


def diffusers_modules(double_blocks: int, refiner_blocks: int) -> dict[str, str | tuple[str, str, str]]:
    """Our module name -> diffusers' module name, or the three modules a fused qkv splits into."""
    names = {
        "img_in.proj": "x_embedder.proj",
        "time_in.mlp.0": "time_embed.timestep_embedder.linear_1",
        "time_in.mlp.2": "time_embed.timestep_embedder.linear_2",
        "time_r_in.mlp.0": "time_embed.timestep_embedder_r.linear_1",
        "time_r_in.mlp.2": "time_embed.timestep_embedder_r.linear_2",
        "cond_type_embedding": "cond_type_embed",
        "txt_in.input_embedder": "context_embedder.proj_in",
        "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
        "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
        "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
        "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
        "byt5_in.layernorm": "context_embedder_2.norm",
        "byt5_in.fc1": "context_embedder_2.linear_1",
        "byt5_in.fc2": "context_embedder_2.linear_2",
        "byt5_in.fc3": "context_embedder_2.linear_3",
        "vision_in.proj.0": "image_embedder.norm_in",
        "vision_in.proj.1": "image_embedder.linear_1",
        "vision_in.proj.3": "image_embedder.linear_2",
        "vision_in.proj.4": "image_embedder.norm_out",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped, see module docstring
    }
    for i in range(refiner_blocks):
        ours, theirs = f"txt_in.individual_token_refiner.blocks.{i}.", f"context_embedder.token_refiner.refiner_blocks.{i}."
        names |= {
            f"{ours}norm1": f"{theirs}norm1", f"{ours}norm2": f"{theirs}norm2",
            f"{ours}self_attn_qkv": (f"{theirs}attn.to_q", f"{theirs}attn.to_k", f"{theirs}attn.to_v"),
            f"{ours}self_attn_proj": f"{theirs}attn.to_out.0",
            f"{ours}mlp.fc1": f"{theirs}ff.net.0.proj", f"{ours}mlp.fc2": f"{theirs}ff.net.2",
            f"{ours}adaLN_modulation.1": f"{theirs}norm_out.linear",
        }
    for i in range(double_blocks):
        ours, theirs = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        names |= {
            f"{ours}img_mod.linear": f"{theirs}norm1.linear",
            f"{ours}txt_mod.linear": f"{theirs}norm1_context.linear",
            f"{ours}img_attn_qkv": (f"{theirs}attn.to_q", f"{theirs}attn.to_k", f"{theirs}attn.to_v"),
            f"{ours}txt_attn_qkv": (f"{theirs}attn.add_q_proj", f"{theirs}attn.add_k_proj", f"{theirs}attn.add_v_proj"),
            f"{ours}img_attn_q_norm": f"{theirs}attn.norm_q", f"{ours}img_attn_k_norm": f"{theirs}attn.norm_k",
            f"{ours}txt_attn_q_norm": f"{theirs}attn.norm_added_q", f"{ours}txt_attn_k_norm": f"{theirs}attn.norm_added_k",
            f"{ours}img_attn_proj": f"{theirs}attn.to_out.0", f"{ours}txt_attn_proj": f"{theirs}attn.to_add_out",
            f"{ours}img_mlp.fc1": f"{theirs}ff.net.0.proj", f"{ours}img_mlp.fc2": f"{theirs}ff.net.2",
            f"{ours}txt_mlp.fc1": f"{theirs}ff_context.net.0.proj", f"{ours}txt_mlp.fc2": f"{theirs}ff_context.net.2",
        }
    return names


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def _block_counts(state: dict, block_pattern: str, refiner_pattern: str) -> tuple[int, int]:
    def count(pattern):
        return 1 + max((int(m[1]) for key in state if (m := re.match(pattern, key))), default=-1)

    return count(block_pattern), count(refiner_pattern)


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = diffusers_modules(*_block_counts(state, r"double_blocks\.(\d+)\.", r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."))
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        target = names[module]
        if isinstance(target, tuple):
            out |= {f"{name}.{param}": piece for name, piece in zip(target, value.chunk(3))}
        else:
            out[f"{target}.{param}"] = _swap_halves(value) if module == SWAPPED_FINAL else value
    return out


def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = diffusers_modules(*_block_counts(state, r"transformer_blocks\.(\d+)\.", r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\."))
    sources = {}  # diffusers module -> (our module, index of its third or None)
    for module, target in names.items():
        for index, name in enumerate(target) if isinstance(target, tuple) else [(None, target)]:
            sources[name] = (module, index)
    out, thirds = {}, {}
    for key, value in state.items():
        name, param = key.rsplit(".", 1)
        if name not in sources:
            raise ValueError(f"unexpected key {key!r} in a diffusers HunyuanVideo-1.5 transformer")
        module, index = sources[name]
        if index is None:
            out[f"{module}.{param}"] = _swap_halves(value) if module == SWAPPED_FINAL else value
        else:
            thirds.setdefault(f"{module}.{param}", [None] * 3)[index] = value
    return out | {key: torch.cat(parts) for key, parts in thirds.items()}


# VAE: the official layout (ours) <-> diffusers' AutoencoderKLHunyuanVideo15, as pairs of key
# prefix templates (the first pair that matches applies; tensors are never changed).
_VAE_PREFIXES = [
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.block.{j}.", "decoder.up_blocks.{i}.resnets.{j}."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{i}.upsamplers.0."),
    ("{part}.mid.block_1.", "{part}.mid_block.resnets.0."),
    ("{part}.mid.block_2.", "{part}.mid_block.resnets.1."),
    *((f"{{part}}.mid.attn_1.{p}.", f"{{part}}.mid_block.attentions.0.to_{p}.") for p in "qkv"),
    ("{part}.mid.attn_1.", "{part}.mid_block.attentions.0."),
]
_FIELDS = {"i": r"\d+", "j": r"\d+", "part": "encoder|decoder"}


def _prefix_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, field in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{field})")
    return re.compile(pattern)


def _rename_prefix(key: str, pairs) -> str:
    for source, target in pairs:
        match = _prefix_regex(source).match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end():]
    return key


def vae_ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {_rename_prefix(key, _VAE_PREFIXES): value for key, value in state.items()}
    return {key.replace(".nin_shortcut.", ".conv_shortcut."): value for key, value in renamed.items()}


def vae_diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse = [(theirs, ours) for ours, theirs in _VAE_PREFIXES]
    renamed = {_rename_prefix(key, inverse): value for key, value in state.items()}
    return {key.replace(".conv_shortcut.", ".nin_shortcut."): value for key, value in renamed.items()}
