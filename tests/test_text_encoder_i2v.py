"""The I2V text stage (LLaVA: image + prompt) against diffusers' HunyuanVideoImageToVideoPipeline
`_get_llama_prompt_embeds` (the oracle), on a tiny random LLaVA in float32."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoImageToVideoPipeline
from PIL import Image

from hyvideo.errors import HyVideoError
from hyvideo.text_encoder import (
    ASSISTANT_HEADER_TOKENS,
    PROMPT_TEMPLATE_I2V,
    LlavaTextEncoder,
)
from tests.tiny_llava import tiny_llava, write_tiny_llava

TEXT_LEN = 40
SHORT = "A cat walks on the grass."
LONG = "A dog runs along the beach at sunset, the camera follows it slowly, soft light. " * 3  # > TEXT_LEN tokens
# float32, the same model on both sides; only the batching of identical ops could differ.
ATOL = 1e-5


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def image():
    y, x = np.mgrid[0:40, 0:56]
    return Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8))


def ours(llava, interleave):
    model, tokenizer, processor = llava
    return LlavaTextEncoder(model.model, tokenizer, processor, interleave, text_len=TEXT_LEN)


def oracle(llava, encoder, image, prompts, interleave):
    model, tokenizer, processor = llava
    crop_start = encoder.crop_start(PROMPT_TEMPLATE_I2V)
    start = tokenizer(PROMPT_TEMPLATE_I2V.split("{}")[0])["input_ids"].index(encoder.image_token_id)
    n = encoder.image_tokens
    template = {"template": PROMPT_TEMPLATE_I2V, "crop_start": crop_start, "image_emb_start": start,
                "image_emb_end": start + n, "image_emb_len": n}
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=model, image_processor=processor)
    return HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds(
        pipe, [image] * len(prompts), prompts, template, device=torch.device("cpu"), dtype=torch.float32,
        max_sequence_length=TEXT_LEN, image_embed_interleave=interleave,
    )


@pytest.mark.parametrize("interleave", [4, 2])  # token_replace, latent_concat
@pytest.mark.parametrize("prompts", [[SHORT], [LONG], [SHORT, "A red flower in the rain."]])
def test_matches_diffusers(llava, image, interleave, prompts):
    encoder = ours(llava, interleave)
    states, mask, truncated = encoder.encode(prompts, image)
    want_states, want_mask = oracle(llava, encoder, image, prompts, interleave)
    assert states.shape == want_states.shape == (len(prompts), 4 // interleave + TEXT_LEN - ASSISTANT_HEADER_TOKENS, 48)
    assert torch.equal(mask, want_mask.to(mask.dtype))
    valid = mask.bool()[..., None]  # padded positions: diffusers passes its own position ids there; masked anyway
    assert torch.allclose(states * valid, want_states * valid, atol=ATOL, rtol=0)
    assert truncated == [p == LONG for p in prompts]


def test_layout_image_then_prompt(llava, image):
    """Image states first (all valid), then the prompt's tokens, the answer's "\\n\\n", then pads."""
    encoder = ours(llava, 4)
    states, mask, _ = encoder.encode(SHORT, image)
    tokenizer = llava[1]
    prompt_tokens = len(tokenizer(SHORT, add_special_tokens=False)["input_ids"])
    # 4 image tokens / 4 = 1 state, the prompt's tokens, the final "\n\n" (the 4 tokens between
    # them, <|eot_id|> and the assistant header, are cut), then pads.
    assert mask[0].tolist() == [1] + [1] * (prompt_tokens + 1) + [0] * (TEXT_LEN - ASSISTANT_HEADER_TOKENS - prompt_tokens - 1)
    other = Image.new("RGB", image.size, (0, 0, 0))
    states_other, _, _ = encoder.encode(SHORT, other)
    assert not torch.allclose(states_other[:, 0], states[:, 0])  # the image state sees the image


def test_from_folder(llava, image, tmp_path):
    folder = write_tiny_llava(tmp_path / "text_encoder_i2v")
    loaded = LlavaTextEncoder.from_folder(folder, "token_replace", dtype=torch.float32, text_len=TEXT_LEN)
    assert loaded.interleave == 4 and loaded.image_tokens == 4
    got = loaded.encode(SHORT, image)
    want = ours(llava, 4).encode(SHORT, image)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_folder_without_image_processor_is_a_user_error(tmp_path):
    folder = write_tiny_llava(tmp_path / "text_encoder_i2v")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(HyVideoError, match="preprocessor_config.json"):
        LlavaTextEncoder.from_folder(folder, "token_replace", dtype=torch.float32)
