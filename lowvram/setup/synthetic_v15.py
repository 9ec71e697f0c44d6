"""Random-weight HunyuanVideo-1.5 model folders, full size or tiny, in Tencent's or the diffusers
layout (`hyvideo/v15_checkpoint.py` lists both), written with `synthetic_checkpoint`'s machinery:
one tensor at a time, each drawn from (seed, component, name), the diffusers tensors converted from
the Tencent ones by `v15_keys` one block at a time, so both layouts hold the same weights.

- "full": the released sizes: the 8.3B DiT stored in float32 as Tencent ships it (33.3 GB), the VAE.
- "tiny": the same architecture (`V15_DIT_CONFIGS["tiny"]`) for CPU tests.
- "-i2v" sizes write an image-to-video transformer folder (480p_i2v) instead of 480p_t2v.

The text encoders (Qwen2.5-VL, byT5, SigLIP) are written as their config.json only, with the released
sizes (`v15_checkpoint.QWEN25_VL_7B_TEXT` etc.) or tiny ones: enough to detect the folder and plan
it. `encoders=True` (diffusers layout: what `lowvram bench --model 1.5-...` runs) writes the
encoders' random weights too, so that `generate` runs the folder end to end: Qwen2.5-VL's language
model and the glyph byT5 with their tokenizers (the tiny Qwen2 tokenizer and ByT5's with a few glyph
tokens, at both sizes: their ids stay far below the real vocabularies), and for image-to-video
SigLIP with its image processor (image_encoder/, feature_extractor/).
"""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import (ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, SiglipVisionConfig,
                          SiglipVisionModel, T5Config, T5EncoderModel)

from hyvideo.v15_checkpoint import BYT5_SMALL, DIFFUSERS_DIT_CLASS, QWEN25_VL_7B_TEXT, SIGLIP_SO400M_384
from hyvideo.v15_config import V15_DIT_CONFIGS, V15_SAMPLING, V15_VAE_CONFIGS, V15DiTConfig, V15VAEConfig
from hyvideo.v15_dit import HunyuanVideo15DiT
from hyvideo.v15_image import siglip_processor_class
from hyvideo.v15_keys import ours_to_diffusers, ours_to_official, vae_ours_to_diffusers
from hyvideo.v15_vae import HunyuanVideo15VAE

from .synthetic_checkpoint import FolderPlan, RandomWeights, WeightFile, meta_layout, sharded, write_plan
from .tiny_tokenizers import build_tiny_qwen2_tokenizer

LAYOUTS = ("official", "diffusers")
TINY_QWEN = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2,
             "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]}}  # (t, h, w) sections: head_dim 24 / 2
TINY_BYT5 = {"d_model": 24, "d_ff": 48, "num_layers": 2, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 12, "vocab_size": 384}
TINY_SIGLIP = {"hidden_size": 36, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 28, "patch_size": 14}


@dataclass(frozen=True)
class V15SyntheticSize:
    dit: V15DiTConfig
    vae: V15VAEConfig
    qwen: dict
    byt5: dict
    siglip: dict
    dtype: torch.dtype  # DiT and VAE storage
    shard_bytes: int
    variant: str  # the transformer folder / the diffusers folder's variant
    encoder_dtype: torch.dtype = torch.bfloat16  # Qwen2.5-VL and byT5 weights (encoders=True)


SIZES = {
    "full": V15SyntheticSize(V15_DIT_CONFIGS["hunyuanvideo-1.5"], V15_VAE_CONFIGS["hunyuanvideo-1.5"], QWEN25_VL_7B_TEXT,
                             BYT5_SMALL, SIGLIP_SO400M_384, torch.float32, 10 * 10**9, "480p_t2v"),
    "tiny": V15SyntheticSize(V15_DIT_CONFIGS["tiny"], V15_VAE_CONFIGS["tiny"], TINY_QWEN, TINY_BYT5, TINY_SIGLIP,
                             torch.float32, 2_000_000, "480p_t2v", torch.float32),
}
SIZES["full-i2v"] = replace(SIZES["full"], variant="480p_i2v")
SIZES["tiny-i2v"] = replace(SIZES["tiny"], variant="480p_i2v")


def _block_of(key: str) -> str:
    match = re.match(r"double_blocks\.\d+\.", key)
    return match[0] if match else "trunk"


def dit_files(layout: str, size: V15SyntheticSize, seed: int, device: str = "cpu") -> tuple[list[WeightFile], dict[str, dict]]:
    """The DiT in our key names drawn tensor by tensor, written in Tencent's or diffusers' names:
    each block is converted alone (`v15_keys`), so memory holds one block's converted tensors."""
    ours = RandomWeights("dit", meta_layout(lambda: HunyuanVideo15DiT(size.dit), size.dtype), seed, device=device)
    convert = ours_to_official if layout == "official" else ours_to_diffusers
    groups: dict[str, list] = {}
    for entry in ours.layout:
        groups.setdefault(_block_of(entry[0]), []).append(entry)
    group_names, converted_layout = [], []
    for entries in groups.values():
        meta = convert({name: torch.empty(shape, device="meta") for name, _, shape in entries})
        group_names.append(list(meta))
        converted_layout += [(name, size.dtype, tuple(t.shape)) for name, t in meta.items()]

    def tensors(shard) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = {name for name, _, _ in shard}
        for entries, names in zip(groups.values(), group_names):
            if not wanted.isdisjoint(names):
                block = convert(dict(ours.tensors(entries)))
                yield from ((name, block[name]) for name in names if name in wanted)

    if layout == "official":
        folder = f"transformer/{size.variant}"
        config = {"_class_name": "HunyuanVideo_1_5_DiffusionTransformer", **official_dit_config(size.dit)}
    else:
        folder = "transformer"
        config = {"_class_name": DIFFUSERS_DIT_CLASS, **size.dit.to_diffusers(),
                  "target_size": 640 if size.variant.startswith("480p") else 960, "task_type": size.variant.split("_")[1]}
    files, index = sharded(folder, "diffusion_pytorch_model", converted_layout, tensors, size.shard_bytes)
    return files, {f"{folder}/config.json": config, **index}


def official_dit_config(config: V15DiTConfig) -> dict:
    """The fields of Tencent's transformer/<variant>/config.json that `V15DiTConfig.from_official` reads."""
    return {"hidden_size": config.hidden_size, "heads_num": config.heads, "mm_double_blocks_depth": config.double_blocks,
            "mm_single_blocks_depth": 0, "mlp_width_ratio": config.mlp_ratio, "patch_size": list(config.patch_size),
            "in_channels": config.latent_channels, "text_states_dim": config.text_states_dim,
            "vision_states_dim": config.vision_states_dim, "rope_dim_list": list(config.rope_axes_dim),
            "rope_theta": config.rope_theta, "use_meanflow": config.use_meanflow, "concat_condition": True,
            "glyph_byT5_v2": True, "use_cond_type_embedding": True, "text_projection": "single_refiner"}


def vae_files(layout: str, size: V15SyntheticSize, seed: int, device: str = "cpu") -> tuple[list[WeightFile], dict[str, dict]]:
    ours = RandomWeights("vae", meta_layout(lambda: HunyuanVideo15VAE(size.vae), size.dtype), seed, device=device)
    if layout == "official":
        file = WeightFile("vae/diffusion_pytorch_model.safetensors", ours.layout, ours.tensors)
        values = {"_class_name": "AutoencoderKLConv3D", **size.vae.to_dict(), "block_out_channels": list(size.vae.block_out_channels)}
        values["ffactor_spatial"] = values.pop("spatial_compression_ratio")
        values["ffactor_temporal"] = values.pop("time_compression_ratio")
        return [file], {"vae/config.json": values}
    names = vae_ours_to_diffusers({name: name for name, _, _ in ours.layout})  # renames only: new name -> our name
    layout = [(new, dtype, shape) for (new, old), (_, dtype, shape) in zip(names.items(), ours.layout)]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for (new, old), (_, dtype, shape) in zip(names.items(), ours.layout):
            yield new, ours.tensor(old, dtype, shape)

    file = WeightFile("vae/diffusion_pytorch_model.safetensors", layout, tensors)
    return [file], {"vae/config.json": {"_class_name": "AutoencoderKLHunyuanVideo15", **size.vae.to_diffusers()}}


def text_configs(layout: str, size: V15SyntheticSize) -> dict[str, dict]:
    """config.json of Qwen2.5-VL, byT5 and (image-to-video) SigLIP, where each layout keeps them."""
    byt5 = json.loads(T5Config(**size.byt5).to_json_string())
    siglip = json.loads(SiglipVisionConfig(**size.siglip).to_json_string())
    if layout == "official":
        qwen = json.loads(Qwen2_5_VLConfig(text_config=size.qwen).to_json_string())
        out = {"text_encoder/llm/config.json": qwen, "text_encoder/byt5-small/config.json": byt5}
        vision = "vision_encoder/siglip/image_encoder/config.json"
    else:
        qwen = json.loads(Qwen2_5_VLTextConfig(**size.qwen).to_json_string())
        out = {"text_encoder/config.json": qwen, "text_encoder_2/config.json": byt5,
               "guider/guider_config.json": {"_class_name": "ClassifierFreeGuidance",
                                             "guidance_scale": V15_SAMPLING[size.variant].guidance_scale}}
        vision = "image_encoder/config.json"
    if "_i2v" in size.variant:
        out[vision] = siglip
    return out


GLYPH_TOKENS = ["<color-0>", "<color-1>", "<en-font-0>", "<zh-font-1>"]  # Glyph-SDXL-v2's kind of tokens, a few
ENCODER_SHARD_BYTES = 5 * 10**9  # save_pretrained's shards in the released text_encoder/ (Qwen2.5-VL-7B: 4 files)


def encoder_files(size: V15SyntheticSize, seed: int, device: str = "cpu") -> FolderPlan:
    """The diffusers layout's text encoders with random weights: text_encoder/ (a Qwen2_5_VLTextModel),
    tokenizer/, text_encoder_2/ (the glyph byT5's T5EncoderModel, its vocabulary with the glyph
    tokens) and tokenizer_2/, as diffusers' conversion script saves them; for an image-to-video
    variant also image_encoder/ (a SiglipVisionModel) and feature_extractor/ (its image processor
    at the model's image size)."""
    qwen_tokenizer = build_tiny_qwen2_tokenizer()
    qwen = Qwen2_5_VLTextConfig(**{**size.qwen, "vocab_size": max(size.qwen["vocab_size"], len(qwen_tokenizer)),
                                   "pad_token_id": qwen_tokenizer.pad_token_id}, architectures=["Qwen2_5_VLTextModel"])
    byt5_tokenizer = ByT5Tokenizer()
    byt5_tokenizer.add_tokens(GLYPH_TOKENS, special_tokens=True)
    byt5 = T5Config(**{**size.byt5, "vocab_size": len(byt5_tokenizer)}, is_encoder_decoder=False, tie_word_embeddings=False,
                    architectures=["T5EncoderModel"])
    plan = FolderPlan([], {}, {"tokenizer": qwen_tokenizer, "tokenizer_2": byt5_tokenizer})
    for folder, kind, config, model_class in (("text_encoder", "qwen", qwen, Qwen2_5_VLTextModel),
                                               ("text_encoder_2", "byt5", byt5, T5EncoderModel)):
        layout = [entry for entry in meta_layout(lambda: model_class(config), size.encoder_dtype)
                  if entry[0] != "encoder.embed_tokens.weight"]  # byT5's tied copy of `shared`, not saved
        weights = RandomWeights(kind, layout, seed, config.initializer_range if kind == "qwen" else None, device)
        files, index = sharded(folder, "model", weights.layout, weights.tensors, ENCODER_SHARD_BYTES)
        plan.weights += files
        plan.json_files |= {f"{folder}/config.json": json.loads(config.to_json_string()), **index}
    if "_i2v" in size.variant:
        siglip = SiglipVisionConfig(**size.siglip, architectures=["SiglipVisionModel"])
        weights = RandomWeights("siglip", meta_layout(lambda: SiglipVisionModel(siglip), size.encoder_dtype), seed, None, device)
        files, index = sharded("image_encoder", "model", weights.layout, weights.tensors, ENCODER_SHARD_BYTES)
        processor = siglip_processor_class()(size={"height": siglip.image_size, "width": siglip.image_size})
        plan.weights += files
        plan.json_files |= {"image_encoder/config.json": json.loads(siglip.to_json_string()), **index,
                            "feature_extractor/preprocessor_config.json": json.loads(processor.to_json_string())}
    return plan


def plan_v15_folder(layout: str, size: "str | V15SyntheticSize" = "tiny", seed: int = 0, encoders: bool = False,
                    device: str = "cpu") -> FolderPlan:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    size = SIZES[size] if isinstance(size, str) else size
    if encoders and layout != "diffusers":
        raise ValueError("random encoder weights are written for the diffusers layout only")
    plan = FolderPlan([], text_configs(layout, size), {})
    parts = [dit_files(layout, size, seed, device), vae_files(layout, size, seed, device)]
    if encoders:
        encoder_plan = encoder_files(size, seed, device)
        parts.append((encoder_plan.weights, encoder_plan.json_files))
        plan.tokenizers |= encoder_plan.tokenizers
    for files, json_files in parts:
        plan.weights += files
        plan.json_files |= json_files
    return plan


def write_v15_checkpoint(root: Path, layout: str = "official", size: "str | V15SyntheticSize" = "tiny", seed: int = 0,
                         on_progress=None, encoders: bool = False) -> Path:
    """Write a random-weight HunyuanVideo-1.5 folder into `root` and return it."""
    return write_plan(root, plan_v15_folder(layout, size, seed, encoders), on_progress)
