"""diffusers as an independent reference implementation (test-only).

diffusers' official->diffusers converter hard-codes the 13B hidden size (3072) when it splits
`linear1`; for small configs we run the same converter source with that one constant replaced,
and fail loudly if the constant is not found exactly once (a diffusers change must not silently
turn the oracle into something else).
"""

import inspect

from hyvideo.config import DiTConfig, VAEConfig

# diffusers is imported inside each function: a test file that imports this module still collects
# where diffusers is missing (`pytest -m cuda` on a GPU machine without it).


def _with_hidden_size(function, hidden_size: int):
    """`function` (a diffusers converter that hard-codes the 13B hidden size) for `hidden_size`."""
    source = inspect.getsource(function)
    constant = "hidden_size = 3072"
    assert source.count(constant) == 1, "diffusers' converter changed; review the oracle"
    namespace = dict(vars(inspect.getmodule(function)))
    exec(source.replace(constant, f"hidden_size = {hidden_size}"), namespace)
    return namespace[function.__name__]


def official_to_diffusers(state_dict: dict, hidden_size: int) -> dict:
    from diffusers.loaders import single_file_utils

    return _with_hidden_size(single_file_utils.convert_hunyuan_video_transformer_to_diffusers, hidden_size)(dict(state_dict))


def musubi_to_official_names(state_dict: dict) -> dict:
    """musubi-tuner's own conversion of its (kohya) LoRA format to official names with lora_A/lora_B
    (`convert_lora.py --target other`, which diffusers' HunyuanVideo loader reads): dots restored
    by its HunyuanVideo rules, alpha / rank folded into both factors as sqrt."""
    alphas = {k.partition(".")[0]: v for k, v in state_dict.items() if k.endswith(".alpha")}
    out = {}
    for key, weight in state_dict.items():
        lora_name, _, kind = key.partition(".")
        if kind == "alpha":
            continue
        module = lora_name.removeprefix("lora_unet_").replace("_", ".")
        for old, new in (("double.blocks.", "double_blocks."), ("single.blocks.", "single_blocks."),
                         ("img.", "img_"), ("txt.", "txt_"), ("attn.", "attn_")):
            module = module.replace(old, new)
        down = kind.startswith("lora_down")
        rank = weight.shape[0] if down else weight.shape[1]
        out[f"diffusion_model.{module}.{'lora_A' if down else 'lora_B'}.weight"] = weight * (alphas[lora_name] / rank).sqrt()
    return out


def load_lora(model, state_dict: dict, hidden_size: int, name: str,
              metadata: dict | None = None) -> None:
    """Load a LoRA as diffusers' HunyuanVideo pipeline does (`load_lora_weights`): official-format
    keys (img_attn_qkv, ...) go through its converter (at this hidden size), then PEFT adapters."""
    from diffusers.loaders import lora_conversion_utils

    if any("img_attn_qkv" in k for k in state_dict):  # the test HunyuanVideoLoraLoaderMixin.lora_state_dict makes
        state_dict = _with_hidden_size(lora_conversion_utils._convert_hunyuan_video_lora_to_diffusers, hidden_size)(dict(state_dict))
    model.load_lora_adapter(dict(state_dict), prefix="transformer", adapter_name=name, metadata=metadata)


def diffusers_transformer(config: DiTConfig, official_state_dict: dict):
    from diffusers import HunyuanVideoTransformer3DModel

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
        image_condition_type=config.image_condition_type,
    )
    converted = official_to_diffusers(official_state_dict, config.hidden_size)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def diffusers_vae(config: VAEConfig):
    """diffusers' HunyuanVideo VAE for `config` (random weights), on its plain, untiled path: no
    spatial tiles, no batch slicing, no frame-wise (temporal tile) coding."""
    from diffusers import AutoencoderKLHunyuanVideo

    levels = len(config.block_out_channels)
    model = AutoencoderKLHunyuanVideo(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        latent_channels=config.latent_channels,
        down_block_types=("HunyuanVideoDownBlock3D",) * levels,
        up_block_types=("HunyuanVideoUpBlock3D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        scaling_factor=config.scaling_factor,
        spatial_compression_ratio=config.spatial_compression_ratio,
        temporal_compression_ratio=config.time_compression_ratio,
        mid_block_add_attention=config.mid_block_add_attention,
    )
    model.disable_tiling()
    model.disable_slicing()
    model.use_framewise_encoding = False
    model.use_framewise_decoding = False
    return model.eval()
