"""A tiny LLaVA of the real one's kind, for the image-to-video text stage tests: the tiny Llama-3
tokenizer with LLaVA's `<image>` token (and "assistant" whole), a 4-layer Llama (hidden 48 = the tiny DiT's
text_states_dim), a 2-layer CLIP vision tower of 28x28 px in 14 px patches (4 image tokens instead
of 576), the 2-layer GELU projector, and a CLIP image processor at 28 px."""

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from hyvideo.config import DIT_CONFIGS
from hyvideo.text_encoder import IMAGE_TOKEN, clip_image_processor_class
from lowvram.setup.synthetic_checkpoint import TINY_LLM
from lowvram.setup.tiny_tokenizers import build_tiny_llama3_tokenizer
from tests.helpers import randomize_

IMAGE_SIZE, PATCH = 28, 14


def tiny_llava(seed: int = 0):
    tokenizer = build_tiny_llama3_tokenizer()
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    # One token, as in Llama-3's vocabulary: the I2V template's assistant header is then the 4 tokens
    # the official code cuts (the tiny BPE alone splits "assistant" into 6).
    tokenizer.add_tokens([AddedToken("assistant", normalized=False)])
    text = LlamaConfig(hidden_size=DIT_CONFIGS["tiny"].text_states_dim, vocab_size=len(tokenizer), **TINY_LLM,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         pad_token_id=tokenizer.pad_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=4)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    randomize_(model, seed)
    processor = clip_image_processor_class()(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, tokenizer, processor


def write_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """The official `text_encoder_i2v/` layout: model, tokenizer and image processor in one folder."""
    model, tokenizer, processor = tiny_llava(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
