"""Text encoders (facts §4) on tiny random models written by lowvram.setup.synthetic_checkpoint, plus the
crop_start check against the real Llama-3 tokenizer when Meta's `llama-models` package is installed.

Everything runs in float32 on CPU; tolerances are for float32 reductions in different orders.
"""

import base64
import hashlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

from hyvideo.errors import HyVideoError
from hyvideo.text_encoder import (
    OFFICIAL_CROP_START,
    PROMPT_TEMPLATE_IMAGE,
    PROMPT_TEMPLATE_VIDEO,
    ClipTextEncoder,
    LlamaTextEncoder,
    TextEmbeddings,
    compute_crop_start,
    encode_prompts,
    template_for_frames,
)
from lowvram.setup.synthetic_checkpoint import write_text_encoder

TEXT_LEN = 40  # short LLM window: SHORT (12 tiny tokens) and LONG (29) fit, 3 x LONG does not
SHORT = "A cat walks on the grass."
LONG = "A dog runs along the beach at sunset, the camera follows it slowly, soft light."
ATOL = 1e-5  # float32, same ops, possibly different kernels/batching


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    return write_text_encoder(root / "text_encoder", "llm"), write_text_encoder(root / "text_encoder_2", "clip")


@pytest.fixture(scope="module")
def llm(folders):
    return LlamaTextEncoder.from_folder(folders[0], dtype=torch.float32, text_len=TEXT_LEN)


@pytest.fixture(scope="module")
def clip(folders):
    return ClipTextEncoder.from_folder(folders[1], dtype=torch.float32)


# --- templates -------------------------------------------------------------------------------------

def test_templates_are_the_official_strings():
    # Copied verbatim from the official prompt templates (facts §4.1): note "video.2." with no space.
    assert PROMPT_TEMPLATE_VIDEO == (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: 1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and transitions used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"  # noqa: E501
    )
    assert PROMPT_TEMPLATE_IMAGE == (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"  # noqa: E501
    )
    assert template_for_frames(1) is PROMPT_TEMPLATE_IMAGE  # single frame → image template
    assert template_for_frames(129) is PROMPT_TEMPLATE_VIDEO
    assert OFFICIAL_CROP_START == {PROMPT_TEMPLATE_VIDEO: 95, PROMPT_TEMPLATE_IMAGE: 36}


@pytest.mark.parametrize("template", [PROMPT_TEMPLATE_VIDEO, PROMPT_TEMPLATE_IMAGE])
def test_crop_start_is_the_token_count_before_the_prompt(llm, template):
    tokenizer = llm.tokenizer
    ids = tokenizer(template.format(SHORT))["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # Manual count: BOS first, then everything up to the user header's "<|end_header_id|>" and the
    # "\n\n" token after it (second header in the template).
    assert tokens[0] == "<|begin_of_text|>"
    user_header_end = [i for i, t in enumerate(tokens) if t == "<|end_header_id|>"][1]
    manual = user_header_end + 2
    assert tokenizer.decode(ids[user_header_end + 1:manual]) == "\n\n"

    assert compute_crop_start(tokenizer, template) == manual
    assert tokenizer.decode(ids[manual:]) == SHORT + "<|eot_id|>"  # kept part = prompt + end of turn


def test_crop_start_needs_one_placeholder(llm):
    with pytest.raises(ValueError):
        compute_crop_start(llm.tokenizer, "no placeholder")


# --- LLM -------------------------------------------------------------------------------------------

def _tokens(llm, prompts, template=PROMPT_TEMPLATE_VIDEO):
    crop = llm.crop_start(template)
    return crop, llm.tokenizer(
        [template.format(p) for p in prompts], padding="max_length", max_length=TEXT_LEN + crop,
        truncation=True, return_tensors="pt",
    )


def test_llm_uses_hidden_states_minus_3_without_final_norm(folders):
    from transformers import AutoModel, AutoTokenizer

    # An already-built model object goes straight into the encoder (as a quantized one would).
    model = AutoModel.from_pretrained(folders[0], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    llm = LlamaTextEncoder(model, tokenizer, text_len=TEXT_LEN, skip_layers=2)
    states, mask, truncated = llm.encode([SHORT])

    crop, tokens = _tokens(llm, [SHORT])
    captured = {}
    layers = model.layers  # 4 layers: hidden_states[-3] is the output of layer index 1 (of 0..3)
    hook = layers[len(layers) - 3].register_forward_hook(
        lambda module, args, out: captured.setdefault("out", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        out = model(**tokens, output_hidden_states=True)
    hook.remove()

    assert len(out.hidden_states) == len(layers) + 1  # embeddings + one per layer
    torch.testing.assert_close(states, out.hidden_states[-3][:, crop:], atol=ATOL, rtol=0)
    torch.testing.assert_close(states, captured["out"][:, crop:], atol=ATOL, rtol=0)  # raw layer output
    # No final norm: RMSNorm would change the values by a lot (random weights, not unit RMS).
    normed = model.norm(captured["out"])[:, crop:]
    assert (states - normed).abs().max() > 1e-2
    assert states.shape == (1, TEXT_LEN, 48) and states.dtype == torch.float32
    assert truncated == [False]
    assert mask.shape == (1, TEXT_LEN)


def test_llm_batch_mask_cropped_and_right_padded(llm):
    states, mask, truncated = llm.encode([SHORT, LONG])
    crop, tokens = _tokens(llm, [SHORT, LONG])
    assert states.shape == (2, TEXT_LEN, 48)
    torch.testing.assert_close(mask, tokens["attention_mask"][:, crop:], atol=0, rtol=0)

    for row, prompt in zip(mask, [SHORT, LONG]):
        n_tokens = len(llm.tokenizer(PROMPT_TEMPLATE_VIDEO.format(prompt))["input_ids"]) - crop
        expected = [1] * min(n_tokens, TEXT_LEN) + [0] * max(TEXT_LEN - n_tokens, 0)  # right padded
        assert row.tolist() == expected
    assert mask[0].sum() < mask[1].sum() < TEXT_LEN  # different lengths, both padded
    assert truncated == [False, False]

    # Right padding + causal attention: a prompt's valid states do not depend on its batch mates.
    alone, alone_mask, _ = llm.encode(SHORT)
    n = int(alone_mask.sum())
    torch.testing.assert_close(states[0, :n], alone[0, :n], atol=ATOL, rtol=0)


def test_llm_truncation_is_reported(llm):
    long_prompt = " ".join([LONG] * 3)  # about 87 tokens, past TEXT_LEN = 40
    _, mask, truncated = llm.encode([SHORT, long_prompt])
    assert truncated == [False, True]
    assert mask[1].tolist() == [1] * TEXT_LEN  # window filled, end of the prompt cut


def test_prompts_are_stripped(llm):
    a, _, _ = llm.encode("  " + SHORT + "\n")
    b, _, _ = llm.encode(SHORT)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("prompts", ["", "   \n", [], [SHORT, " "]])
def test_empty_prompt_is_a_user_error(llm, clip, prompts):
    with pytest.raises(HyVideoError, match="prompt"):
        llm.encode(prompts)
    with pytest.raises(HyVideoError, match="prompt"):
        clip.encode(prompts)


# --- CLIP ------------------------------------------------------------------------------------------

def test_clip_pooled_is_pooler_output(clip):
    prompts = [SHORT, LONG]
    pooled, truncated = clip.encode(prompts)
    tokens = clip.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(**tokens)
        no_mask = clip.model(input_ids=tokens["input_ids"])  # diffusers' way: no mask, same result
    assert pooled.shape == (2, 40)
    torch.testing.assert_close(pooled, out.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, no_mask.pooler_output, atol=ATOL, rtol=0)
    # pooler_output = final-normed state at the first EOS token.
    eos = (tokens["input_ids"] == clip.tokenizer.eos_token_id).int().argmax(dim=1)
    torch.testing.assert_close(pooled, out.last_hidden_state[torch.arange(2), eos], atol=ATOL, rtol=0)
    assert truncated == [False, False]


def test_clip_truncation_is_reported(clip):
    _, truncated = clip.encode([SHORT, "red " * 100])  # 100 words + BOS/EOS > 77 tokens
    assert truncated == [False, True]


# --- both ------------------------------------------------------------------------------------------

def test_encode_prompts_picks_template_by_frames(llm, clip):
    video = encode_prompts(llm, clip, [SHORT, LONG], frames=33)
    image = encode_prompts(llm, clip, [SHORT, LONG], frames=1)
    assert isinstance(video, TextEmbeddings)
    assert video.text_states.shape == (2, TEXT_LEN, 48) and video.text_states_2.shape == (2, 40)
    assert video.text_mask.shape == (2, TEXT_LEN)
    image_states, image_mask, _ = llm.encode([SHORT, LONG], PROMPT_TEMPLATE_IMAGE)
    torch.testing.assert_close(image.text_states, image_states, atol=0, rtol=0)
    # Different system prompts → different states for the same user text.
    assert (image.text_states - video.text_states).abs().max() > 1e-3
    torch.testing.assert_close(image.text_states_2, video.text_states_2, atol=0, rtol=0)  # CLIP: no template
    assert video.truncated == [False, False] and video.truncated_2 == [False, False]


# --- loading errors --------------------------------------------------------------------------------

def test_missing_folder_is_a_user_error(tmp_path):
    missing = tmp_path / "ckpts" / "text_encoder"
    with pytest.raises(HyVideoError, match=re.escape(str(missing))):
        LlamaTextEncoder.from_folder(missing)
    with pytest.raises(HyVideoError, match=re.escape(str(missing))):
        ClipTextEncoder.from_folder(missing)


@pytest.mark.parametrize("remove, message", [
    ("config.json", "config.json"),
    ("tokenizer.json", "tokenizer"),
    ("model.safetensors", "could not load"),
])
def test_incomplete_folder_is_a_user_error(folders, tmp_path, remove, message):
    for source, encoder in zip(folders, (LlamaTextEncoder, ClipTextEncoder)):
        broken = tmp_path / source.name
        shutil.copytree(source, broken)
        (broken / remove).unlink()
        with pytest.raises(HyVideoError, match=message) as error:
            encoder.from_folder(broken, dtype=torch.float32)
        assert str(broken) in str(error.value) and "\n" not in str(error.value)  # one line for the CLI


def test_tiny_writers_are_deterministic(folders, tmp_path):
    again = write_text_encoder(tmp_path / "llm", "llm"), write_text_encoder(tmp_path / "clip", "clip")
    for first, second in zip(folders, again):
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


# --- real Llama-3 tokenizer (Task C) ---------------------------------------------------------------

# Meta's Llama-3 tokenizer as shipped in the `llama-models` wheel (llama_models/llama3/tokenizer.model):
# a tiktoken BPE file of 128,000 ranks; 256 special tokens follow. The hash pins the file we checked.
LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]


def _llama3_tokenizer_file() -> Path | None:
    spec = importlib.util.find_spec("llama_models")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """A transformers fast tokenizer equivalent to HF's Llama-3 tokenizer.json, built from Meta's
    tiktoken file with transformers' own tiktoken converter (ranks read here, so tiktoken itself is
    not needed)."""
    path = _llama3_tokenizer_file()
    if path is None:
        pytest.skip("Meta's llama-models package (Llama-3 tokenizer file) is not installed")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LLAMA3_TOKENIZER_SHA256

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class LocalTikTokenConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(file):
            ranks = {}
            for line in Path(file).read_text().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    specials = LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]
    backend = LocalTikTokenConverter(
        str(path),
        pattern=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # noqa: E501
        extra_special_tokens=specials,
    ).converted()
    # HF's Llama-3 tokenizer.json prepends BOS with a template post-processor.
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def test_real_llama3_crop_start_is_95_and_36(llama3_tokenizer):
    tok = llama3_tokenizer
    assert len(tok) == 128_256  # 128,000 BPE ranks + 256 special tokens
    ids = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert ids == [128000, 128006, 128007, 128009]  # Llama-3's published special token ids
    assert tok("hello world")["input_ids"] == [128000, 15339, 1917]  # known Llama-3 ids (BOS, hello, world)

    assert compute_crop_start(tok, PROMPT_TEMPLATE_VIDEO) == 95  # official crop_start, video template
    assert compute_crop_start(tok, PROMPT_TEMPLATE_IMAGE) == 36  # official crop_start, image template
    full = tok(PROMPT_TEMPLATE_VIDEO.format(SHORT))["input_ids"]
    assert tok.decode(full[95:]) == SHORT + "<|eot_id|>"


def test_real_llama3_i2v_template(llama3_tokenizer):
    """With LLaVA's `<image>` added as one token: crop_start 103 and `<image>` at 5 (the official
    `dit-llm-encode-video-i2v` constants), the assistant header is the 4 tokens cut before the final
    "\\n\\n" (Llama-3 id 271, the official `double_return_token_id`)."""
    import copy

    from hyvideo.text_encoder import ASSISTANT_HEADER_TOKENS, OFFICIAL_CROP_START_I2V, PROMPT_TEMPLATE_I2V

    tok = copy.deepcopy(llama3_tokenizer)
    tok.add_tokens(["<image>"], special_tokens=True)
    assert compute_crop_start(tok, PROMPT_TEMPLATE_I2V) == OFFICIAL_CROP_START_I2V == 103
    full = tok(PROMPT_TEMPLATE_I2V.format(SHORT))["input_ids"]
    assert full.index(tok.convert_tokens_to_ids("<image>")) == 5
    assert full[-1] == 271 and full.count(271) == 4  # the official code finds the last of these
    assert tok.decode(full[-1 - ASSISTANT_HEADER_TOKENS : -1]) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    assert tok.decode(full[103 : -1 - ASSISTANT_HEADER_TOKENS]) == SHORT
