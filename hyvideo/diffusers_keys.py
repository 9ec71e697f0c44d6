"""Name mapping between the official DiT state dict and diffusers' (facts §2).

`diffusers_parts(key)` says which diffusers tensors make up one official tensor: fused projections
(qkv, single-block linear1) are concatenations of diffusers' separate q/k/v(/proj_mlp) along the
output dimension, and the final layer's modulation has its (shift, scale) halves swapped in
diffusers. Loading a diffusers checkpoint into our official-layout model walks this table backwards,
lazily (`DiffusersAsOfficial`): a fused tensor is made only when it is asked for, so quantizing the
DiT one tensor at a time never holds more than one of them.
"""

import re
from collections.abc import Iterator, Mapping

import torch

# (official pattern, diffusers replacement(s)); a list means "concatenate these in order".
_BLOCK_RULES = {
    "double": [
        ("img_mod.linear", "norm1.linear"),
        ("txt_mod.linear", "norm1_context.linear"),
        ("img_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
        ("txt_attn_qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
        ("img_attn_q_norm", "attn.norm_q"),
        ("img_attn_k_norm", "attn.norm_k"),
        ("txt_attn_q_norm", "attn.norm_added_q"),
        ("txt_attn_k_norm", "attn.norm_added_k"),
        ("img_attn_proj", "attn.to_out.0"),
        ("txt_attn_proj", "attn.to_add_out"),
        ("img_mlp.fc1", "ff.net.0.proj"),
        ("img_mlp.fc2", "ff.net.2"),
        ("txt_mlp.fc1", "ff_context.net.0.proj"),
        ("txt_mlp.fc2", "ff_context.net.2"),
    ],
    "single": [
        ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
        ("linear2", "proj_out"),
        ("q_norm", "attn.norm_q"),
        ("k_norm", "attn.norm_k"),
        ("modulation.linear", "norm.linear"),
    ],
    "refiner": [
        ("norm1", "norm1"),
        ("norm2", "norm2"),
        ("self_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
        ("self_attn_proj", "attn.to_out.0"),
        ("mlp.fc1", "ff.net.0.proj"),
        ("mlp.fc2", "ff.net.2"),
        ("adaLN_modulation.1", "norm_out.linear"),
    ],
}
_BLOCK_PREFIXES = {
    "double": (r"double_blocks\.(\d+)\.", "transformer_blocks.{}."),
    "single": (r"single_blocks\.(\d+)\.", "single_transformer_blocks.{}."),
    "refiner": (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.", "context_embedder.token_refiner.refiner_blocks.{}."),
}
_PLAIN = {
    "img_in.proj": "x_embedder.proj",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED_HALVES = "final_layer.adaLN_modulation.1"


def diffusers_parts(key: str) -> list[str]:
    """Diffusers keys whose concatenation (dim 0) is the official tensor `key`."""
    module, _, leaf = key.rpartition(".")  # leaf: weight / bias
    if module in _PLAIN:
        return [f"{_PLAIN[module]}.{leaf}"]
    for kind, (pattern, target) in _BLOCK_PREFIXES.items():
        match = re.match(pattern, module)
        if match:
            rest = module[match.end():]
            for official, diffusers in _BLOCK_RULES[kind]:
                if rest == official:
                    names = diffusers if isinstance(diffusers, list) else [diffusers]
                    return [f"{target.format(match.group(1))}{name}.{leaf}" for name in names]
    raise KeyError(f"no diffusers name for official key {key!r}")


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class DiffusersAsOfficial(Mapping):
    """Read-only official-layout state dict over a diffusers one (e.g. memory-mapped safetensors).

    Keys come in the order given (the model's). Each lookup fuses, renames and swaps halves afresh
    and keeps nothing, so memory grows only by what the caller holds on to. `shapes()` reads only
    the parts' shapes, never their data."""

    def __init__(self, diffusers_sd: Mapping, parts: dict[str, list[str]]):
        self._source, self._parts = diffusers_sd, parts

    def __getitem__(self, key: str) -> torch.Tensor:
        tensors = [self._source[p] for p in self._parts[key]]
        tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        return swap_halves(tensor) if key.startswith(SWAPPED_HALVES) else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every fused tensor. A part whose trailing dims differ from the first part's
        (so it could not be fused) stands in for the whole, so a shape check reports it."""
        shapes = {}
        for key, parts in self._parts.items():
            part_shapes = [tuple(self._source[p].shape) for p in parts]
            odd = [s for s in part_shapes if s[1:] != part_shapes[0][1:]]
            shapes[key] = odd[0] if odd else (sum(s[0] for s in part_shapes), *part_shapes[0][1:])
        return shapes


def diffusers_to_official(diffusers_sd: Mapping, official_keys) -> tuple[DiffusersAsOfficial, list[str], list[str]]:
    """The official-layout view of `diffusers_sd` for `official_keys` (those whose parts are all
    there), the missing diffusers keys and the unused ones; names only, no tensor is read."""
    parts = {key: diffusers_parts(key) for key in official_keys}
    missing = [p for names in parts.values() for p in names if p not in diffusers_sd]
    complete = {key: names for key, names in parts.items() if all(p in diffusers_sd for p in names)}
    used = {p for names in parts.values() for p in names}
    return DiffusersAsOfficial(diffusers_sd, complete), missing, sorted(k for k in diffusers_sd if k not in used)


def official_to_diffusers_tensors(key: str, tensor: torch.Tensor, hidden_size: int) -> list[tuple[str, torch.Tensor]]:
    """The diffusers tensors one official tensor becomes: renamed; fused projections split along
    dim 0 (qkv: three equal parts; a single block's linear1: q, k, v of `hidden_size` rows each,
    then the MLP input rows); the final layer's modulation with its halves swapped."""
    if key.startswith(SWAPPED_HALVES):
        tensor = swap_halves(tensor)
    parts = diffusers_parts(key)
    if len(parts) == 1:
        return [(parts[0], tensor)]
    sizes = part_sizes(len(parts), tensor.shape[0], hidden_size)
    return [(name, piece.contiguous()) for name, piece in zip(parts, torch.split(tensor, sizes, dim=0))]


def part_sizes(parts: int, rows: int, hidden_size: int) -> list[int]:
    """Rows of each diffusers part of a fused official tensor with `rows` rows: qkv is three equal
    parts; a single block's linear1 is q, k, v of `hidden_size` rows each, then the MLP input."""
    if parts == 1:
        return [rows]
    return [hidden_size] * 3 + [rows - 3 * hidden_size] if parts == 4 else [rows // 3] * 3


def official_to_diffusers(official_sd: dict) -> dict:
    """A whole official state dict in diffusers' names and layout."""
    hidden_size = official_sd["img_in.proj.weight"].shape[0]
    return {name: piece for key, tensor in official_sd.items()
            for name, piece in official_to_diffusers_tensors(key, tensor, hidden_size)}
