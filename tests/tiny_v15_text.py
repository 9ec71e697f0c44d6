"""Tiny HunyuanVideo-1.5 encoders of the real ones' kind, for the 1.5 text and image tests, written
in both folder layouts (hyvideo/v15_text.py `find_v15_text_files`):

- Qwen2.5-VL: the tiny Qwen2 tokenizer (lowvram/setup/tiny_tokenizers.py: 108-token template
  prefix as the real one) and a 4-layer language model of width 48 (= the tiny DiT's
  text_states_dim) with M-RoPE; Tencent's folder holds the whole Qwen2_5_VLForConditionalGeneration
  (a 1-block vision tower and the LM head beside it), diffusers' only the Qwen2_5_VLTextModel.
- byT5: ByT5Tokenizer (bytes, no files needed) plus a few Glyph-SDXL-v2-style color and font tokens,
  a 2-layer T5 encoder of width 24 (= byt5_states_dim); Tencent's layout splits it as byt5-small
  (the base vocabulary, other weights) + Glyph-SDXL-v2 (assets JSON and `byt5_model.pt`).
- SigLIP: a 2-layer vision tower of width 36 (= vision_states_dim) on 24 px images in 8 px patches
  (9 tokens instead of 729) and its image processor at 24 px.
"""

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel, T5Config,
    T5EncoderModel,
)

from hyvideo.v15_config import V15_DIT_CONFIGS
from hyvideo.v15_image import siglip_processor_class
from hyvideo.v15_text import GLYPH_CHECKPOINT, GLYPH_CHECKPOINT_PREFIX, GLYPH_COLOR_FILE, GLYPH_FONT_FILE, glyph_tokens
from lowvram.setup.tiny_tokenizers import build_tiny_qwen2_tokenizer
from tests.helpers import randomize_

TINY = V15_DIT_CONFIGS["tiny"]
GLYPH_COLORS = {"white": 0, "black": 1, "red": 2}
GLYPH_FONTS = {"en-Arial": 0, "zh-Song": 1}  # font code -> index: tokens <en-font-0>, <zh-font-1>


def tiny_qwen(seed: int = 0):
    """(Qwen2_5_VLForConditionalGeneration, tokenizer) with random weights."""
    tokenizer = build_tiny_qwen2_tokenizer()
    pad = tokenizer.pad_token_id
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TINY.text_states_dim, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=len(tokenizer), bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}),  # head_dim 12: sections sum to 6
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=TINY.text_states_dim, num_heads=2, intermediate_size=32,
                           fullatt_block_indexes=[0]),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model, tokenizer


def tiny_glyph_byt5(seed: int = 1):
    """(T5EncoderModel with the glyph tokens in its vocabulary, ByT5Tokenizer with them): what
    diffusers' conversion script saves as text_encoder_2/ and tokenizer_2/."""
    tokenizer = ByT5Tokenizer()
    tokenizer.add_tokens(glyph_tokens_of(GLYPH_COLORS, GLYPH_FONTS), special_tokens=True)
    config = T5Config(vocab_size=len(tokenizer), d_model=TINY.byt5_states_dim, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False)
    model = T5EncoderModel(config).eval()
    randomize_(model, seed)
    return model, tokenizer


def glyph_tokens_of(colors: dict, fonts: dict) -> list[str]:
    """The tokens `hyvideo.v15_text.glyph_tokens` reads from Glyph-SDXL-v2's assets."""
    return [f"<color-{i}>" for i in range(len(colors))] + [f"<{code[:2]}-font-{fonts[code]}>" for code in fonts]


def tiny_siglip(seed: int = 2):
    config = SiglipVisionConfig(hidden_size=TINY.vision_states_dim, intermediate_size=72, num_hidden_layers=2,
                                num_attention_heads=2, image_size=24, patch_size=8)
    model = SiglipVisionModel(config).eval()
    randomize_(model, seed)
    processor = siglip_processor_class()(size={"height": 24, "width": 24}, resample=Image.BICUBIC,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, processor


def write_diffusers_encoders(root: Path) -> Path:
    """text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, image_encoder/, feature_extractor/."""
    qwen, tokenizer = tiny_qwen()
    qwen.model.language_model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    byt5, byt5_tokenizer = tiny_glyph_byt5()
    byt5.save_pretrained(root / "text_encoder_2")
    byt5_tokenizer.save_pretrained(root / "tokenizer_2")
    siglip, processor = tiny_siglip()
    siglip.save_pretrained(root / "image_encoder")
    processor.save_pretrained(root / "feature_extractor")
    return root


def write_official_encoders(root: Path, wrapped_glyph_checkpoint: bool = True) -> Path:
    """Tencent's ckpts/: text_encoder/llm (whole Qwen2.5-VL + tokenizer), text_encoder/byt5-small
    (base byT5 with other weights), text_encoder/Glyph-SDXL-v2 (assets, checkpoints/byt5_model.pt:
    the glyph encoder's weights, under `state_dict` with the training wrapper's prefix, or bare),
    vision_encoder/siglip/{image_encoder, feature_extractor}. Same weights as the diffusers folders."""
    text = root / "text_encoder"
    qwen, tokenizer = tiny_qwen()
    qwen.save_pretrained(text / "llm")
    tokenizer.save_pretrained(text / "llm")
    glyph_model, _ = tiny_glyph_byt5()
    base_config = T5Config(**{**glyph_model.config.to_dict(), "vocab_size": len(ByT5Tokenizer())})
    base = T5EncoderModel(base_config).eval()
    randomize_(base, seed=9)  # replaced by the glyph checkpoint
    base.save_pretrained(text / "byt5-small")
    ByT5Tokenizer().save_pretrained(text / "byt5-small")
    glyph = text / "Glyph-SDXL-v2"
    (glyph / "assets").mkdir(parents=True)
    (glyph / GLYPH_COLOR_FILE).write_text(json.dumps(GLYPH_COLORS))
    (glyph / GLYPH_FONT_FILE).write_text(json.dumps(GLYPH_FONTS))
    assert glyph_tokens(glyph) == glyph_tokens_of(GLYPH_COLORS, GLYPH_FONTS)
    (glyph / GLYPH_CHECKPOINT).parent.mkdir(parents=True)
    weights = {k: v.clone() for k, v in glyph_model.encoder.state_dict().items()}
    if wrapped_glyph_checkpoint:
        weights = {"state_dict": {GLYPH_CHECKPOINT_PREFIX + k: v for k, v in weights.items()}}
    torch.save(weights, glyph / GLYPH_CHECKPOINT)
    siglip, processor = tiny_siglip()
    siglip.save_pretrained(root / "vision_encoder" / "siglip" / "image_encoder")
    processor.save_pretrained(root / "vision_encoder" / "siglip" / "feature_extractor")
    return root
