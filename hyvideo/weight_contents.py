"""What a model folder's weight files hold, against what each place in the folder needs, from the
files' indexes alone (names, dtypes and shapes: `weight_io.read_weight_index`; no tensor data).

Why: a file that reads is not yet the right file. Two 13B DiTs go by the same file name
(mp_rank_00_model_states.pt, text-to-video and image-to-video), LoRAs and whole LLaVAs get put where
a DiT or a bare Llama belongs, and each loads until its first mis-shaped tensor, minutes into a run.
These checks name what a file is and what belongs in its place.

What a place needs comes from the loaders, run on the index: the DiT and the VAE are built on the
meta device from their config (the folder's config.json; an official DiT's from its shapes) and
compared name by name and shape by shape as the loader compares them (`check_state_dict`). What a
file is comes from its own names and shapes: a LoRA's adapter keys (`lora.is_lora`), a DiT's input
and output channels, the VAE's module names, LLaVA's vision tower, CLIP's token embedding.

HunyuanVideo-1.5 places (`check_v15_dit`, `check_v15_vae`) are checked the same way against the
1.5 models; a 1.5 DiT or VAE is told from the 13B one by its own module names (byT5 and
condition-type embeddings; the 1.5 VAE's), so either one in the other's place is named. Its text
encoders by what they are: Qwen2 (q/k/v biases, which Llama lacks) and T5.

Limit: the token_replace I2V DiT has the text-to-video DiT's names and shapes (only its values
differ), so in an official folder the two are told apart only by the folder they are in. A
33-channel (latent_concat) DiT is named wherever it is. The 1.5 text- and image-to-video DiTs
share names and shapes too: the folder (official) or config.json (diffusers) says which it is.
"""

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import (
    ModelFiles,
    check_state_dict,
    infer_dit_config,
    load_dit_state_dict,
    load_vae_state_dict,
)
from .config import VAE_CONFIGS
from .diffusers_keys import diffusers_parts
from .dit import HunyuanVideoDiT
from .errors import HyVideoError
from .lora import is_lora
from .v15_config import V15_VAE_CONFIGS
from .v15_keys import vae_diffusers_to_ours, vae_ours_to_diffusers
from .vae import CausalVAE
from .weight_io import read_torch_file, read_weight_index

Index = Mapping[str, torch.Tensor]  # name -> meta tensor
LATENT_CONCAT = "the HunyuanVideo-I2V DiT (33-channel latent_concat)"


def dit_channels(index: Index) -> tuple[int, int] | None:
    """(input, output) latent channels of a DiT state dict in official or diffusers names, else None."""
    official = ("img_in.proj.weight", "final_layer.linear.weight")
    for patch_in, final in (official, tuple(diffusers_parts(key)[0] for key in official)):
        if patch_in in index and final in index and index[patch_in].dim() == 5:
            weight = index[patch_in]  # [hidden, in, pt, ph, pw]
            return weight.shape[1], index[final].shape[0] // math.prod(weight.shape[2:])
    return None


def _is_vae(index: Index) -> bool:
    """Every name is one of the VAE's (a smaller VAE has a subset of the 13B release's names)."""
    with torch.device("meta"):
        names = set(CausalVAE(VAE_CONFIGS["884-16c-hy"]).state_dict())
    return bool(index) and all(key.removeprefix("vae.") in names for key in index)


def _is_v15_dit(index: Index) -> bool:
    """The 1.5 DiT's glyph (byT5) and condition-type embeddings, in Tencent's or diffusers' names."""
    return any(key.startswith(("byt5_in.", "cond_type_embedding.", "context_embedder_2.", "cond_type_embed.")) for key in index)


def _is_v15_vae(index: Index) -> bool:
    """Every name is one of the 1.5 VAE's, in Tencent's or diffusers' names."""
    from .v15_vae import HunyuanVideo15VAE

    with torch.device("meta"):
        names = set(HunyuanVideo15VAE(V15_VAE_CONFIGS["hunyuanvideo-1.5"]).state_dict())
    return bool(index) and (set(index) <= names or set(index) <= set(vae_ours_to_diffusers(dict.fromkeys(names))))


KINDS = {  # what a state dict can be -> how a person is told
    "lora": "a LoRA (lora_A/lora_down keys)",
    "v15_dit": "a HunyuanVideo-1.5 DiT (8.3B: byT5 glyph and condition-type embeddings)",
    "v15_vae": "the HunyuanVideo-1.5 VAE (32 latent channels)",
    "latent_concat": LATENT_CONCAT,
    "dit": "a {channels}-channel HunyuanVideo DiT (text-to-video, or the I2V token_replace DiT: the same names and shapes)",
    "llava": "a whole LLaVA (vision tower, projector and Llama)",
    "clip": "a whole CLIP (text and vision)",
    "clip_text": "CLIP's text model",
    "llama": "a bare Llama language model (no vision tower)",
    "qwen": "Qwen2.5-VL's language model (no vision tower)",
    "qwen_vl": "a whole Qwen2.5-VL (vision tower and language model)",
    "t5": "a T5 encoder (byT5's kind)",
    "vae": "the HunyuanVideo VAE",
    "unknown": "none of this model's parts ({count} tensors, first {first})",
}


def kind_of(index: Index) -> str:
    """Which of `KINDS` a state dict is, from its names and shapes."""
    channels = dit_channels(index)
    if is_lora(index):
        return "lora"
    if _is_v15_dit(index):  # before the channels: 65 = 2 * 32 + 1 reads like a latent_concat DiT
        return "v15_dit"
    if channels:
        return "latent_concat" if channels[0] == 2 * channels[1] + 1 else "dit"
    if any("vision_tower." in key for key in index):
        return "llava"
    if any("token_embedding." in key for key in index):  # CLIP's (Llama's is embed_tokens)
        return "clip" if any("vision_model." in key for key in index) else "clip_text"
    if any(".self_attn.q_proj." in key for key in index) and any("embed_tokens" in key for key in index):
        if any(".self_attn.q_proj.bias" in key for key in index):  # Qwen2's q/k/v have biases, Llama's none
            return "qwen_vl" if any("visual." in key for key in index) else "qwen"
        return "llama"
    if any(".SelfAttention.q." in key for key in index):
        return "t5"
    if _is_vae(index):
        return "vae"
    return "v15_vae" if _is_v15_vae(index) else "unknown"


def describe(index: Index) -> str:
    """What a state dict is, named for a person."""
    channels = dit_channels(index)
    return KINDS[kind_of(index)].format(channels=channels and channels[0], count=len(index), first=next(iter(index), "none"))


def _needed_dit(files: ModelFiles) -> str:
    return "the HunyuanVideo-I2V DiT" if files.image_to_video else "the text-to-video DiT"


def check_dit(files: ModelFiles) -> None:
    """The DiT place: a DiT of the folder's kind (an official text-to-video place refuses the
    33-channel I2V DiT; a diffusers folder's config.json says which it needs), complete, every
    tensor of the shape the model built from that config has."""
    index = read_weight_index(files.dit_weights)
    kind, what, needed = kind_of(index), describe(index), _needed_dit(files)
    if kind not in ("dit", "latent_concat"):
        raise HyVideoError(f"this is {what}{'' if kind == 'v15_dit' else ', not a DiT'}; {needed} belongs here")
    if files.layout == "official" and not files.image_to_video and kind == "latent_concat":
        raise HyVideoError(f"this is {what}; {needed} belongs here")
    state_dict, config = load_dit_state_dict(files, index=True)  # the loader's own key checks, on meta tensors
    if files.layout == "diffusers" and (config.image_condition_type is not None) != files.image_to_video:
        folder = "image-to-video (it has image_processor/)" if files.image_to_video else "text-to-video (no image_processor/)"
        raise HyVideoError(f"this is {what}, as its config.json says, but the folder is {folder}; {needed} belongs here")
    if dit_channels(index)[0] != config.in_channels:
        raise HyVideoError(f"this is {what}, but {files.dit_config.parent.name}/config.json describes a "
                           f"{config.in_channels}-channel DiT")
    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    check_state_dict(model, state_dict, files.dit_weights[0])


def check_fp8_dit(files: ModelFiles) -> None:
    """Tencent's FP8 DiT: the text-to-video DiT's names and shapes (its block linears in float8)."""
    index = read_torch_file(files.dit_fp8, index=True)
    if kind_of(index) != "dit":
        raise HyVideoError(f"this is {describe(index)}; the text-to-video DiT in FP8 belongs here")
    with torch.device("meta"):
        model = HunyuanVideoDiT(infer_dit_config(index))
    check_state_dict(model, index, files.dit_fp8)


def check_vae(files: ModelFiles) -> None:
    """The VAE place: the VAE of the folder's config.json, name by name and shape by shape."""
    state_dict, config = load_vae_state_dict(files, index=True)
    if kind_of(state_dict) != "vae":
        raise HyVideoError(f"this is {describe(state_dict)}{'' if kind_of(state_dict) == 'v15_vae' else ', not the VAE'}; "
                           "the HunyuanVideo VAE belongs here")
    with torch.device("meta"):
        model = CausalVAE(config)
    check_state_dict(model, state_dict, files.vae_weights)


def check_text_encoder(weights: list[Path], kind: str) -> None:
    """A text encoder folder's weights (all its shards): `kind` "llm" (a bare Llama: text-to-video),
    "llava" (the whole LLaVA: image-to-video) or "clip" (CLIP-L; a whole CLIPModel serves too);
    for HunyuanVideo-1.5 "qwen" (Qwen2.5-VL whole, as Tencent's folder holds it, or its language
    model, as diffusers') or "byt5"."""
    index = read_weight_index(weights)
    needed = {"llm": (("llama",), "the bare Llama language model belongs here (text-to-video; `lowvram download` puts it here)"),
              "llava": (("llava",), ("image-to-video needs the whole LLaVA here (xtuner/llava-llama-3-8b-v1_1-transformers; "
                                     "`lowvram download --model i2v`)")),
              "clip": (("clip", "clip_text"), "CLIP-L's text model belongs here"),
              "qwen": (("qwen", "qwen_vl"), "HunyuanVideo-1.5 needs Qwen2.5-VL-7B-Instruct (or its language model) here"),
              "byt5": (("t5",), "HunyuanVideo-1.5 needs byT5 here (google/byt5-small, or the diffusers glyph byT5)")}
    fits, what = needed[kind]
    if kind_of(index) not in fits:
        raise HyVideoError(f"this is {describe(index)}; {what}")


def check_v15_dit(files) -> None:
    """A HunyuanVideo-1.5 DiT place (`v15_checkpoint.V15ModelFiles`): a 1.5 DiT, every tensor of the
    shape the model built from the place's config.json has (the loader's conversion, run on the
    index: no tensor data is read)."""
    from .v15_checkpoint import load_v15_dit_state_dict, v15_dit_config
    from .v15_dit import HunyuanVideo15DiT

    index = read_weight_index(files.dit_weights)
    kind = kind_of(index)
    needed = f"the HunyuanVideo-1.5 {files.variant} DiT belongs here"
    if kind != "v15_dit":
        raise HyVideoError(f"this is {describe(index)}{'' if kind in ('dit', 'latent_concat') else ', not a DiT'}; {needed}")
    config = v15_dit_config(files)
    with torch.device("meta"):
        model = HunyuanVideo15DiT(config)
    check_state_dict(model, load_v15_dit_state_dict(files, list(model.state_dict())), files.dit_weights[0])


def check_v15_vae(files) -> None:
    """A HunyuanVideo-1.5 VAE place: the 1.5 VAE of the place's config.json, name by name and shape by shape."""
    from .v15_checkpoint import v15_vae_config
    from .v15_vae import HunyuanVideo15VAE

    index = read_weight_index([files.vae_weights])
    if kind_of(index) != "v15_vae":
        raise HyVideoError(f"this is {describe(index)}; the HunyuanVideo-1.5 VAE belongs here")
    state = vae_diffusers_to_ours(index) if files.layout == "diffusers" else index
    with torch.device("meta"):
        model = HunyuanVideo15VAE(v15_vae_config(files))
    check_state_dict(model, state, files.vae_weights)
