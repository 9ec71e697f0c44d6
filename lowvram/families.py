"""What each model family brings to a plan, by its sizes (no weights read): the text encoders of
the 13B model, of HunyuanVideo-I2V and of HunyuanVideo-1.5 (`TextEncoderSize`s for the text
stage), the text tokens its DiT reads, and the released models `lowvram plan --model` and
`download --model` know by name. `lowvram.stages.model_sizes` builds the same from a folder's
configs; `lowvram.planner.plan` takes either.

    plan(profile, 1280, 720, 121, **released_model_sizes("1.5-720p_t2v", 1280, 720))
"""

import dataclasses

from hyvideo.config import DIT_CONFIGS
from hyvideo.errors import HyVideoError
from hyvideo.text_encoder import (
    ASSISTANT_HEADER_TOKENS,
    IMAGE_EMBED_INTERLEAVE,
    OFFICIAL_CROP_START_I2V,
    TEXT_LEN,
)
from hyvideo.pipeline import TRAINED_FRAMES
from hyvideo.v15_pipeline import forwards_per_step
from hyvideo.v15_config import (
    V15_DIT_CONFIGS,
    V15_SAMPLING,
    V15_TRAINED_FRAMES,
    V15_VAE_CONFIGS,
    V15DiTConfig,
    V15VAEConfig,
)
from quant.bytes import (
    CLIP_TEXT_PARAMS,
    LLAVA_IMAGE_TOKENS,
    LLAVA_VISION_PARAMS,
    LLM_EMBED_PARAMS,
    LLM_LINEAR_PARAMS,
    LLM_OTHER_PARAMS,
    TextEncoderSize,
    param_counts,
)

from .activations import text_activation_bytes
from .sizes import align_up


def hunyuan_text_encoders(llm_linear: int = LLM_LINEAR_PARAMS, llm_other: int = LLM_EMBED_PARAMS + LLM_OTHER_PARAMS,
                          clip: int = CLIP_TEXT_PARAMS) -> tuple[TextEncoderSize, ...]:
    """HunyuanVideo's text stage (facts §4): the LLaVA-Llama-3-8B language model, stored per the
    profile's encoder scheme, and CLIP-L's text model in fp16; the defaults are the released
    checkpoints' counts. Loaded together, run one after the other (the LLM's forward is the peak)."""
    return (TextEncoderSize("llm", llm_linear, llm_other, text_activation_bytes()), TextEncoderSize("clip", 0, clip))


def hunyuan_i2v_text_encoders(llm_linear: int = LLM_LINEAR_PARAMS, llm_other: int = LLM_EMBED_PARAMS + LLM_OTHER_PARAMS,
                              vision: int = LLAVA_VISION_PARAMS, clip: int = CLIP_TEXT_PARAMS,
                              image_tokens: int = LLAVA_IMAGE_TOKENS, vision_layers: int = 24, vision_hidden: int = 1024,
                              vision_mlp: int = 4096) -> tuple[TextEncoderSize, ...]:
    """HunyuanVideo-I2V's text encoders, as the runner loads them: LLaVA's language model (per the
    encoder scheme) over the I2V template with the image's `image_tokens` positions in it (351 ->
    934 at full size), its CLIP vision tower and projector (16-bit), and CLIP-L's text model. The
    VAE that encodes the image in the same stage is `plan`'s `image_size`. The defaults are the
    released counts."""
    positions = TEXT_LEN + OFFICIAL_CROP_START_I2V + image_tokens - 1
    vision_tokens = image_tokens + 1  # the class token runs through the tower too
    return (TextEncoderSize("llm", llm_linear, llm_other, text_activation_bytes(positions)),
            TextEncoderSize("vision", 0, vision, text_activation_bytes(vision_tokens, vision_hidden, vision_layers, vision_mlp)),
            TextEncoderSize("clip", 0, clip))


def i2v_text_tokens(image_condition_type: str, image_tokens: int = LLAVA_IMAGE_TOKENS) -> int:
    """Text tokens the I2V DiT reads at most: the kept image states, then the prompt's."""
    return image_tokens // IMAGE_EMBED_INTERLEAVE[image_condition_type] + TEXT_LEN - ASSISTANT_HEADER_TOKENS


def hunyuan15_text_encoders(qwen_text_config, byt5_config, siglip_config=None) -> tuple[TextEncoderSize, ...]:
    """HunyuanVideo-1.5's text stage from its encoders' transformers configs, counted on the meta
    device: Qwen2.5-VL's language model (per the encoder scheme; its forward over the template and
    the 1000-token prompt keeps every layer's hidden state), byT5's encoder (16-bit), and for
    image-to-video SigLIP's vision model (16-bit, one image) in a second phase: the runner frees
    Qwen and byT5 before it loads SigLIP and the VAE that encodes the image (`plan(image_size=)`
    counts the VAE's encode in the last phase)."""
    from transformers import Qwen2_5_VLTextModel, SiglipVisionModel, T5EncoderModel

    from hyvideo.v15_checkpoint import QWEN_MAX_TOKENS, QWEN_TEMPLATE_TOKENS

    linear, other = param_counts(lambda: Qwen2_5_VLTextModel(qwen_text_config))
    q = qwen_text_config
    qwen_activations = text_activation_bytes(QWEN_MAX_TOKENS + QWEN_TEMPLATE_TOKENS, q.hidden_size, q.num_hidden_layers,
                                             q.intermediate_size)
    encoders = (TextEncoderSize("llm", linear, other, qwen_activations),
                TextEncoderSize("byt5", 0, sum(param_counts(lambda: T5EncoderModel(byt5_config)))))
    if siglip_config is None:
        return encoders
    s = siglip_config
    vision_tokens = (s.image_size // s.patch_size) ** 2
    return (*encoders, TextEncoderSize("vision", 0, sum(param_counts(lambda: SiglipVisionModel(s))),
                                       text_activation_bytes(vision_tokens, s.hidden_size, s.num_hidden_layers, s.intermediate_size),
                                       phase=1))


def hunyuan15_text_tokens(siglip_config=None) -> int:
    """Text-stream tokens the 1.5 DiT reads at most: Qwen's prompt, byT5's glyph tokens and for
    image-to-video SigLIP's image tokens (padding is dropped at batch 1: a worst case)."""
    from hyvideo.v15_checkpoint import BYT5_MAX_TOKENS, QWEN_MAX_TOKENS

    image = 0 if siglip_config is None else (siglip_config.image_size // siglip_config.patch_size) ** 2
    return QWEN_MAX_TOKENS + BYT5_MAX_TOKENS + image


def released_v15_text_configs(image_to_video: bool):
    """The released 1.5 encoders' configs (Qwen2.5-VL-7B's language model, byT5-small, SigLIP)."""
    from transformers import Qwen2_5_VLTextConfig, SiglipVisionConfig, T5Config

    from hyvideo.v15_checkpoint import BYT5_SMALL, QWEN25_VL_7B_TEXT, SIGLIP_SO400M_384

    return (Qwen2_5_VLTextConfig(**QWEN25_VL_7B_TEXT), T5Config(**BYT5_SMALL),
            SiglipVisionConfig(**SIGLIP_SO400M_384) if image_to_video else None)


# `lowvram plan --model`: the released 13B models (no weights needed); "1.5-<variant>": a released
# HunyuanVideo-1.5 transformer (hyvideo.v15_config.V15_SAMPLING)
RELEASED_DITS = {"t2v": "HYVideo-T/2-cfgdistill", "i2v": "HYVideo-T/2-I2V-16ch", "i2v-33ch": "HYVideo-T/2-I2V-33ch"}
RELEASED_V15 = {f"1.5-{variant}": variant for variant in V15_SAMPLING}
RELEASED_NAMES = {"t2v": "HunyuanVideo 13B text-to-video", "i2v": "HunyuanVideo-I2V 13B (token_replace)",
                  "i2v-33ch": "HunyuanVideo-I2V 13B (latent_concat, its first release)",
                  **{model: f"HunyuanVideo-1.5 {variant}" for model, variant in RELEASED_V15.items()}}


def v15_model_sizes(dit_config: V15DiTConfig, vae_config: V15VAEConfig, guidance_scale: float, text_configs,
                    image_size: tuple[int, int]) -> dict:
    """What a 1.5 model contributes to `plan` (stages.model_sizes for a folder, or a released one)."""
    qwen, byt5, siglip = text_configs
    return {"dit_config": dit_config, "vae_config": vae_config,
            "text_encoders": hunyuan15_text_encoders(qwen, byt5, siglip),
            "text_tokens": hunyuan15_text_tokens(siglip), "forwards_per_step": forwards_per_step(guidance_scale),
            **({"image_size": image_size} if siglip is not None else {})}


def trained_frames(model: str | None) -> int:
    """The default --frames: a model's trained clip length (HunyuanVideo 129, HunyuanVideo-1.5 121);
    `model`: a released model's name (RELEASED_NAMES), None for the 13B model."""
    return V15_TRAINED_FRAMES if model in RELEASED_V15 else TRAINED_FRAMES


def released_model_sizes(model: str, width: int, height: int) -> dict:
    """What a released model contributes to `plan` (as stages.model_sizes for its folder); the
    I2V image is encoded at the video's size."""
    if model in RELEASED_V15:
        variant = RELEASED_V15[model]
        config = dataclasses.replace(V15_DIT_CONFIGS["hunyuanvideo-1.5"], use_meanflow=variant.endswith("step_distilled"))
        return v15_model_sizes(config, V15_VAE_CONFIGS["hunyuanvideo-1.5"], V15_SAMPLING[variant].guidance_scale,
                               released_v15_text_configs("_i2v" in variant), (align_up(height, 16), align_up(width, 16)))
    if model not in RELEASED_DITS:
        raise HyVideoError(f"--model must be one of {', '.join([*RELEASED_DITS, *RELEASED_V15])}; got {model!r}")
    dit_config = DIT_CONFIGS[RELEASED_DITS[model]]
    if dit_config.image_condition_type is None:
        return {"dit_config": dit_config}
    return {"dit_config": dit_config, "text_tokens": i2v_text_tokens(dit_config.image_condition_type),
            "text_encoders": hunyuan_i2v_text_encoders(), "image_size": (align_up(height, 16), align_up(width, 16))}
