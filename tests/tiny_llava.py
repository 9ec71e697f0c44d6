"""A tiny LLaVA of the real one's kind, for the image-to-video text stage tests: the synthetic
checkpoint's (lowvram/setup/synthetic_checkpoint.py, size "tiny-i2v"): the tiny Llama-3 tokenizer
with LLaVA's `<image>` token (and "assistant" whole), a 4-layer Llama (hidden 48 = the tiny DiT's
text_states_dim), a 2-layer CLIP vision tower of 28x28 px in 14 px patches (4 image tokens instead
of 576), the 2-layer GELU projector, and a CLIP image processor at 28 px; weights from
`randomize_` here."""

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from lowvram.setup.synthetic_checkpoint import SIZES, llava_config, llava_image_processor
from lowvram.setup.tiny_tokenizers import build_tiny_llava_tokenizer
from tests.helpers import randomize_



def tiny_llava(seed: int = 0):
    tokenizer = build_tiny_llava_tokenizer()
    config = llava_config(SIZES["tiny-i2v"], tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model, tokenizer, llava_image_processor(SIZES["tiny-i2v"])


def write_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """The official `text_encoder_i2v/` layout: model, tokenizer and image processor in one folder."""
    model, tokenizer, processor = tiny_llava(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
