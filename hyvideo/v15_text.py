"""HunyuanVideo-1.5 prompt encoding: a prompt -> `V15Prompt` (Qwen2.5-VL states + byT5 glyph states).

Two encoders read the prompt (diffusers 0.42 `HunyuanVideo15Pipeline.encode_prompt`; Tencent's
`hyvideo/pipelines/hunyuan_video_pipeline.py` and `hyvideo/models/text_encoders/`):

- Qwen2.5-VL-7B's language model (`Qwen2_5_VLTextModel`: no vision tower, no LM head). The prompt
  is the user turn of a chat after a fixed system message (`SYSTEM_MESSAGE`), rendered by the
  tokenizer's own chat template with the generation prompt (`<|im_start|>assistant\\n`) appended;
  an empty prompt becomes " ". Tokens: right padded to `crop_start + 1000` (truncating). States:
  `hidden_states[-3]` (the output of layer N - 2, no final norm). The first `crop_start` positions
  (system turn and `<|im_start|>user\\n`) are cut, so text_states is [1, 1000, 3584] with its mask.
  crop_start: Tencent computes it as the end of the first `<|im_start|>user\\n` in the tokenized
  template (`TextEncoder.calculate_crop_start`); diffusers hard-codes that value for the real
  tokenizer, 108 (`prompt_template_encode_start_idx`). Here it is computed as Tencent does.
- byT5 (Glyph-SDXL-v2's fine-tuned byt5-small encoder, `T5EncoderModel`, d_model 1472) reads only
  the text the prompt quotes: every "..." or “...” span (`glyph_text`), de-duplicated when there
  are several, written as `Text "a". Text "b". `, tokenized to 256 bytes (padded, truncating) and
  encoded with its mask. A prompt that quotes nothing gives zeros [1, 256, 1472] with an all-zero
  mask (the DiT then ignores the glyph stream).

Real CFG's unconditional embeddings are the same encoding of the negative prompt, "" by default
(diffusers: `encode_prompt(negative_prompt)`); so the negative's byT5 part is zeros unless the
negative prompt itself quotes text. (Tencent's sampler always encodes "" for byT5's negative; the
two differ only for a negative prompt with quotes; diffusers, the oracle here, is followed.)

Both encoders are wrapped as already-built transformers objects, so the caller may pass an NF4
Qwen (quant/nf4.py `load_qwen_text_nf4`) or one on another device; `V15TextEncoder.from_files`
builds plain ones. Folders (`V15TextFiles`): diffusers' `text_encoder/` (a saved
Qwen2_5_VLTextModel), `tokenizer/`, `text_encoder_2/` (T5EncoderModel with the glyph tokens),
`tokenizer_2/` (ByT5Tokenizer with them); Tencent's `text_encoder/llm/` (the whole
Qwen2.5-VL-7B-Instruct, of which only the language model is read), `text_encoder/byt5-small/`
(google/byt5-small) and `text_encoder/Glyph-SDXL-v2/` (`checkpoints/byt5_model.pt`, the encoder's
fine-tuned weights, and `assets/color_idx.json`, `assets/multilingual_10-lang_idx.json`, whose
color and font tokens are added to byT5's tokenizer and vocabulary first, as Tencent's
`load_glyph_byT5_v2` and diffusers' conversion script do).
"""

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HyVideoError, one_line
from .text_encoder import load_model_part
from .v15_pipeline import V15Prompt

# diffusers' `HunyuanVideo15Pipeline.system_message` = Tencent's video template
# (`PROMPT_TEMPLATE_ENCODE_VIDEO_JSON`): both write it with backslash line continuations inside
# the string, so each numbered item follows " " + 8 spaces of indentation. Kept byte for byte.
SYSTEM_MESSAGE = (
    "You are a helpful assistant. Describe the video by detailing the following aspects:         "
    "1. The main content and theme of the video.         "
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.         "
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.         "
    "4. background environment, light, style and atmosphere.         "
    "5. camera angles, movements, and transitions used in the video."
)
USER_MARKER = "<|im_start|>user\n"  # the prompt starts after this (Tencent's crop rule)
DIFFUSERS_CROP_START = 108  # diffusers' hard-coded crop for the real Qwen2.5-VL tokenizer
TEXT_LEN = 1000  # Qwen tokens kept after the crop (diffusers `tokenizer_max_length`, Tencent max_length)
SKIP_LAYERS = 2  # hidden_states[-(2 + 1)]
BYT5_LEN = 256  # byT5 bytes (diffusers `tokenizer_2_max_length`, Tencent `byt5_max_length`)
GLYPH_PATTERN = re.compile(r"\"(.*?)\"|“(.*?)”")  # straight or curly double quotes, shortest spans
GLYPH_COLOR_FILE = "assets/color_idx.json"
GLYPH_FONT_FILE = "assets/multilingual_10-lang_idx.json"
GLYPH_CHECKPOINT = "checkpoints/byt5_model.pt"
GLYPH_CHECKPOINT_PREFIX = "module.text_tower.encoder."  # Glyph-SDXL-v2's training wrapper


def chat_messages(prompt: str) -> list[dict]:
    """The conversation the Qwen tokenizer's chat template renders (diffusers' `format_text_input`):
    an empty prompt becomes one space."""
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt or " "}]


def glyph_text(prompt: str) -> str | None:
    """What byT5 reads: the quoted spans of the prompt as `Text "a". Text "b". `, or None when it
    quotes nothing. Spans are de-duplicated (first occurrence kept) only when there are several,
    an empty "" counts as a span (diffusers' `extract_glyph_texts`, Tencent's
    `_extract_glyph_texts` + `MultilingualPromptFormat.format_prompt` without color or font)."""
    spans = [straight or curly for straight, curly in GLYPH_PATTERN.findall(prompt)]
    if len(spans) > 1:
        spans = list(dict.fromkeys(spans))
    if not spans:
        return None
    return ". ".join(f'Text "{span}"' for span in spans) + ". "


def compute_crop_start(tokenizer) -> int:
    """Tokens before the prompt in the rendered template: the end of the first `<|im_start|>user\\n`
    (Tencent's `calculate_crop_start`; 108 for Qwen2.5-VL's tokenizer). The system turn does not
    depend on the prompt, so any prompt gives the same count."""
    ids = tokenizer.apply_chat_template(chat_messages("a photo of a cat"), add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    marker = tokenizer(USER_MARKER, add_special_tokens=False)["input_ids"]
    for i in range(len(ids) - len(marker) + 1):
        if ids[i : i + len(marker)] == marker:
            return i + len(marker)
    raise HyVideoError(f"the Qwen tokenizer's chat template has no {USER_MARKER!r}: is it Qwen2.5-VL's tokenizer?")


@dataclass
class V15TextFiles:
    """Where the 1.5 text and image encoders live in one model folder (see the module docstring)."""

    layout: str  # "official" | "diffusers"
    llm: Path  # Qwen2_5_VLTextModel folder (diffusers) or the whole Qwen2.5-VL-7B-Instruct (Tencent)
    llm_tokenizer: Path
    byt5: Path  # T5EncoderModel with glyph tokens (diffusers) or google/byt5-small (Tencent)
    byt5_tokenizer: Path
    glyph: Path | None  # Tencent: Glyph-SDXL-v2/ (checkpoint + token assets); diffusers: None (folded in)
    vision: Path | None  # SiglipVisionModel folder; None when absent (text-to-video only)
    vision_processor: Path | None  # SiglipImageProcessor folder (preprocessor_config.json)


def find_v15_text_files(root: str | Path, layout: str) -> V15TextFiles:
    """The encoder folders of a 1.5 model folder in `layout` ("diffusers": the
    hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-* repos; "official": Tencent's `ckpts/` as
    checkpoints-download.md lays it out, with FLUX.1-Redux-dev's SigLIP in vision_encoder/siglip/).
    Missing text encoder folders raise HyVideoError naming them; the vision encoder is optional."""
    root = Path(root)
    if layout == "diffusers":
        files = V15TextFiles(layout, root / "text_encoder", root / "tokenizer", root / "text_encoder_2",
                             root / "tokenizer_2", None, root / "image_encoder", root / "feature_extractor")
    elif layout == "official":
        text = root / "text_encoder"
        siglip = root / "vision_encoder" / "siglip"
        files = V15TextFiles(layout, text / "llm", text / "llm", text / "byt5-small", text / "byt5-small",
                             text / "Glyph-SDXL-v2", siglip / "image_encoder", siglip / "feature_extractor")
    else:
        raise ValueError(f"unknown layout {layout!r}")
    needed = [files.llm / "config.json", files.byt5 / "config.json"]
    if files.glyph is not None:
        needed += [files.glyph / GLYPH_CHECKPOINT, files.glyph / GLYPH_COLOR_FILE, files.glyph / GLYPH_FONT_FILE]
    missing = [str(p.relative_to(root)) for p in needed if not p.is_file()]
    if missing:
        raise HyVideoError(f"HunyuanVideo-1.5 text encoder files missing in {root}: {', '.join(missing)}")
    if not (files.vision / "config.json").is_file() or not (files.vision_processor / "preprocessor_config.json").is_file():
        files.vision = files.vision_processor = None
    return files


def qwen_text_config(folder: str | Path):
    """The language model's config: diffusers saves a Qwen2_5_VLTextConfig, Tencent's folder holds
    the whole Qwen2.5-VL's (its `text_config`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    return getattr(config, "text_config", config)


def load_qwen_text_model(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu", **kwargs):
    """Qwen2_5_VLTextModel from either layout, straight onto `device`. From the whole Qwen2.5-VL
    only the language model's weights are read (its `model.layers...` keys; the vision tower and
    LM head are skipped unread). kwargs go to from_pretrained (e.g. quant/'s quantization_config)."""
    from transformers import Qwen2_5_VLTextModel

    return load_model_part(Qwen2_5_VLTextModel, folder, "the Qwen2.5-VL language model", dtype, device,
                           config=qwen_text_config(folder), **kwargs)


def glyph_tokens(glyph: Path) -> list[str]:
    """The color and font tokens Glyph-SDXL-v2 adds to byT5 (Tencent's `add_special_token` with
    color, font and multilingual on): `<color-i>` per color, then `<xx-font-i>` per font."""
    fonts = json.loads((glyph / GLYPH_FONT_FILE).read_text())
    colors = json.loads((glyph / GLYPH_COLOR_FILE).read_text())
    return [f"<color-{i}>" for i in range(len(colors))] + [f"<{code[:2]}-font-{fonts[code]}>" for code in fonts]


def load_byt5(files: V15TextFiles, dtype: torch.dtype = torch.float32, device="cpu"):
    """(T5EncoderModel, ByT5Tokenizer). diffusers: as saved. Tencent: byt5-small's encoder with the
    glyph tokens added (vocabulary resized), then Glyph-SDXL-v2's weights (`byt5_model.pt`: the
    T5 stack's keys, bare or under `state_dict` with the `module.text_tower.encoder.` prefix; all
    of them, the resized embedding included, as Tencent's strict load requires)."""
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(files.byt5_tokenizer, local_files_only=True)
        model = T5EncoderModel.from_pretrained(files.byt5, dtype=torch.float32, local_files_only=True)
        if files.glyph is not None:
            tokenizer.add_tokens(glyph_tokens(files.glyph), special_tokens=True)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            state = torch.load(files.glyph / GLYPH_CHECKPOINT, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            state = {k.removeprefix(GLYPH_CHECKPOINT_PREFIX): v for k, v in state.items()
                     if k.startswith(GLYPH_CHECKPOINT_PREFIX) or not k.startswith("module.")}
            missing, unexpected = model.encoder.load_state_dict(state, strict=False)  # embed_tokens is `shared`
            if missing or unexpected:
                raise ValueError(f"Glyph-SDXL-v2 checkpoint does not fit byt5-small: "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as error:
        raise HyVideoError(f"could not load the byT5 glyph encoder from {files.byt5}: {one_line(error)}") from error
    return model.to(device, dtype).eval(), tokenizer


class V15TextEncoder:
    """Prompt -> V15Prompt with Qwen2.5-VL's language model and the byT5 glyph encoder.

    `llm` is called like a transformers Qwen2_5_VLTextModel (input_ids, attention_mask,
    output_hidden_states=True), `byt5` like a T5EncoderModel; each gets its inputs on its own
    device (`device_of`), and the states come back on the CPU in float32."""

    def __init__(self, llm, llm_tokenizer, byt5, byt5_tokenizer, text_len: int = TEXT_LEN, byt5_len: int = BYT5_LEN):
        llm_tokenizer.padding_side = "right"  # Tencent loads it so; the crop assumes the prompt starts at crop_start
        self.llm, self.llm_tokenizer = llm, llm_tokenizer
        self.byt5, self.byt5_tokenizer = byt5, byt5_tokenizer
        self.text_len, self.byt5_len = text_len, byt5_len
        self.crop_start = compute_crop_start(llm_tokenizer)

    @classmethod
    def from_files(cls, files: V15TextFiles, dtype: torch.dtype = torch.bfloat16, device="cpu", llm=None) -> "V15TextEncoder":
        """Plain encoders in `dtype` on `device`; `llm`: the language model already loaded (e.g. NF4).
        (Tencent runs Qwen in fp16 and byT5 in float32, diffusers both as loaded; bf16 here.)"""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(files.llm_tokenizer, padding_side="right", local_files_only=True)
            if llm is None:
                llm = load_qwen_text_model(files.llm, dtype, device)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise HyVideoError(f"could not load the Qwen2.5-VL text encoder from {files.llm}: {one_line(error)}") from error
        byt5, byt5_tokenizer = load_byt5(files, dtype, device)
        return cls(llm, tokenizer, byt5, byt5_tokenizer)

    def encode(self, prompt: str, negative_prompt: str | None = None) -> tuple[V15Prompt, V15Prompt]:
        """(conditional, unconditional) embeddings; the negative prompt defaults to "" as in
        diffusers' pipeline. Callers that run one forward per step (guidance 1) may skip the
        second by calling `encode_one`."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise HyVideoError("the prompt is empty: describe the video to generate")
        return self.encode_one(prompt), self.encode_one(negative_prompt or "")

    def truncated(self, prompt: str) -> list[str]:
        """Which encoders cut the end of this prompt off (for a warning): the Qwen tokens past
        `text_len`, the glyph text's bytes past `byt5_len` (its end-of-sequence token included)."""
        cut = []
        ids = self.llm_tokenizer.apply_chat_template([chat_messages(prompt)], add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"][0]
        if len(ids) > self.crop_start + self.text_len:
            cut.append(f"Qwen2.5-VL ({self.text_len} tokens)")
        text = glyph_text(prompt)
        if text is not None and len(self.byt5_tokenizer(text)["input_ids"]) > self.byt5_len:
            cut.append(f"byT5 glyph text ({self.byt5_len} bytes)")
        return cut

    def encode_one(self, prompt: str) -> V15Prompt:
        text_states, text_mask = self.qwen_states(prompt)
        byt5_states, byt5_mask = self.byt5_states(prompt)
        return V15Prompt(text_states, text_mask, byt5_states, byt5_mask)

    def qwen_states(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, text_len, D] float32, [1, text_len] int64) of diffusers' `_get_mllm_prompt_embeds`."""
        tokens = self.llm_tokenizer.apply_chat_template(
            [chat_messages(prompt)], add_generation_prompt=True, tokenize=True, return_dict=True,
            padding="max_length", max_length=self.text_len + self.crop_start, truncation=True, return_tensors="pt",
        )
        device = device_of(self.llm)
        with torch.no_grad():
            states = self.llm(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
                              output_hidden_states=True).hidden_states[-(SKIP_LAYERS + 1)]
        return states[:, self.crop_start :].float().cpu(), tokens["attention_mask"][:, self.crop_start :].long()

    def byt5_states(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, byt5_len, d_model] float32, [1, byt5_len] int64) of diffusers' `_get_byt5_prompt_embeds`."""
        text = glyph_text(prompt)
        if text is None:
            return torch.zeros(1, self.byt5_len, self.byt5.config.d_model), torch.zeros(1, self.byt5_len, dtype=torch.long)
        tokens = self.byt5_tokenizer(text, padding="max_length", max_length=self.byt5_len, truncation=True,
                                     add_special_tokens=True, return_tensors="pt")
        device = device_of(self.byt5)
        with torch.no_grad():
            states = self.byt5(input_ids=tokens["input_ids"].to(device),
                               attention_mask=tokens["attention_mask"].to(device).float())[0]
        return states.float().cpu(), tokens["attention_mask"].long()


def device_of(model) -> torch.device:
    """Where a model wants its inputs: transformers models say so, else its first weight's device."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device
