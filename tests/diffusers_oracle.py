"""diffusers as an independent reference implementation (test-only).

diffusers' official->diffusers converter hard-codes the 13B hidden size (3072) when it splits
`linear1`; for small configs we run the same converter source with that one constant replaced,
and fail loudly if the constant is not found exactly once (a diffusers change must not silently
turn the oracle into something else).
"""

import inspect

from diffusers import HunyuanVideoTransformer3DModel
from diffusers.loaders import single_file_utils

from hyvideo.config import DiTConfig


def official_to_diffusers(state_dict: dict, hidden_size: int) -> dict:
    source = inspect.getsource(single_file_utils.convert_hunyuan_video_transformer_to_diffusers)
    constant = "hidden_size = 3072"
    assert source.count(constant) == 1, "diffusers' converter changed; review the oracle"
    namespace = dict(vars(single_file_utils))
    exec(source.replace(constant, f"hidden_size = {hidden_size}"), namespace)
    return namespace["convert_hunyuan_video_transformer_to_diffusers"](dict(state_dict))


def diffusers_transformer(config: DiTConfig, official_state_dict: dict) -> HunyuanVideoTransformer3DModel:
    model = HunyuanVideoTransformer3DModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_attention_heads=config.heads,
        attention_head_dim=config.head_dim,
        num_layers=config.double_blocks,
        num_single_layers=config.single_blocks,
        num_refiner_layers=config.refiner_blocks,
        mlp_ratio=config.mlp_ratio,
        patch_size=config.patch_size[1],
        patch_size_t=config.patch_size[0],
        guidance_embeds=config.guidance_embed,
        text_embed_dim=config.text_states_dim,
        pooled_projection_dim=config.text_states_dim_2,
        rope_theta=config.rope_theta,
        rope_axes_dim=config.rope_axes_dim,
    )
    converted = official_to_diffusers(official_state_dict, config.hidden_size)
    model.load_state_dict(converted, strict=True)
    return model.eval()
