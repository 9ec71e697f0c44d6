"""Prompt → text embeddings for the DiT: the LLM (text_states) and CLIP (text_states_2), facts §4.

HunyuanVideo conditions on two encodings of the prompt:

- `text_states` [B, 256, 4096]: the prompt, wrapped in a fixed chat template, run through the
  LLaVA-Llama-3-8B language model; the hidden states *before* the last two decoder layers
  (`hidden_states[-3]`, no final norm), with the template's system part cut off (`crop_start`
  tokens), plus the matching attention mask (1 = prompt token, right padded).
- `text_states_2` [B, 768]: CLIP-L's pooled output of the raw prompt (77 tokens).

Image-to-video (HunyuanVideo-I2V) replaces the LLM by the whole LLaVA-Llama-3-8B
(`LlavaForConditionalGeneration`: CLIP-ViT-L/14-336 vision tower + projector + the same Llama):
the image's 576 projected patch embeddings stand in for the `<image>` token of the I2V template, and
`text_states` = [every 4th (token_replace) or 2nd (latent_concat) image state ; the prompt's states]
(`LlavaTextEncoder`).

The encoders wrap already-built transformers objects, so a caller can pass a model it built itself
(e.g. a 4-bit quantized LLM, or one streamed layer by layer); `from_folder` builds the plain ones
from the official checkpoint folders (`ckpts/text_encoder`, `ckpts/text_encoder_2`).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hyvideo.errors import HyVideoError

# Exact template strings of the official code (`dit-llm-encode-video`, `dit-llm-encode`); `{}` is
# replaced by the stripped prompt. Note: no space after "video.", "objects." before "2.".."5.".
PROMPT_TEMPLATE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Describe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
PROMPT_TEMPLATE_IMAGE = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)

# The official I2V video template (`dit-llm-encode-video-i2v`): `<image>` after the system header,
# "according to the reference image", a blank line after the system turn, and the assistant header
# after the prompt (its 4 tokens before the final "\n\n" are cut from the kept states).
PROMPT_TEMPLATE_I2V = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\n"
    "Describe the video by detailing the following aspects according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

# What compute_crop_start gives for the real Llama-3 tokenizer (the official code hard-codes these).
OFFICIAL_CROP_START = {PROMPT_TEMPLATE_VIDEO: 95, PROMPT_TEMPLATE_IMAGE: 36}
# The same for the I2V template, LLaVA's `<image>` being one added token; `<image>` is token 5.
OFFICIAL_CROP_START_I2V = 103

IMAGE_TOKEN = "<image>"
# Image states kept: every k-th of the 576 (official `image_embed_interleave`, per conditioning type).
IMAGE_EMBED_INTERLEAVE = {"token_replace": 4, "latent_concat": 2}
ASSISTANT_HEADER_TOKENS = 4  # <|eot_id|> <|start_header_id|> assistant <|end_header_id|>

TEXT_LEN = 256  # LLM tokens kept after the crop
SKIP_LAYERS = 2  # hidden_state_skip_layer: use hidden_states[-(2 + 1)]
CLIP_MAX_LENGTH = 77
# One of these must be in a checkpoint folder (fast tokenizer file, sentencepiece/tiktoken model,
# or BPE vocabulary); transformers' own error for a folder without any is long and unclear.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def template_for_frames(frames: int) -> str:
    """The official code uses the image template for single-frame generation, else the video one."""
    return PROMPT_TEMPLATE_IMAGE if frames == 1 else PROMPT_TEMPLATE_VIDEO


def compute_crop_start(tokenizer, template: str) -> int:
    """Number of tokens before the user's text in the tokenized `template`, BOS included.

    These positions (system prompt and user header) are dropped from the LLM output so the kept
    tokens start at the prompt. Counting with the tokenizer itself, rather than hard-coding 95/36,
    keeps the crop right for any tokenizer; for Llama-3 it gives the official 95 (video) and 36
    (image). Tokenizing the prefix alone gives the same tokens as the start of the full text because
    the prefix ends with a special token followed by "\\n\\n", which Llama-3's pre-tokenizer always
    splits off from the (stripped) prompt that follows.
    """
    if template.count("{}") != 1:
        raise ValueError("a prompt template needs exactly one '{}' for the prompt")
    prefix = template.split("{}")[0]
    return len(tokenizer(prefix, add_special_tokens=True)["input_ids"])


def _clean_prompts(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a batch → list of stripped prompts; empty ones are a user error."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        raise HyVideoError("no prompt given: pass at least one prompt")
    cleaned = []
    for prompt in batch:
        if not isinstance(prompt, str):
            raise HyVideoError(f"a prompt must be text, got {type(prompt).__name__}")
        if not prompt.strip():
            raise HyVideoError("the prompt is empty: describe the video to generate")
        cleaned.append(prompt.strip())
    return cleaned


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Untruncated token counts (special tokens included), to tell callers what truncation cut.
    verbose=False: the over-length warning is the point here, reported through `truncated`."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]


def _model_device(model) -> torch.device:
    """Where the model wants its inputs: transformers models say so, else the first weight's device."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def _check_folder(folder: str | Path, what: str, model: bool = True, tokenizer: bool = True) -> Path:
    """A checkpoint folder must exist and hold config.json (a model) and/or tokenizer files before
    transformers is asked to load it (otherwise transformers would treat a wrong path as a hub repo
    id and fail obscurely)."""
    path = Path(folder)
    if not path.is_dir():
        raise HyVideoError(
            f"{what} folder not found: {path}. Download the HunyuanVideo checkpoints or pass the right folder."
        )
    if model and not (path / "config.json").is_file():
        raise HyVideoError(
            f"{what} folder {path} has no config.json: it must be a transformers model saved with "
            "save_pretrained (config.json, *.safetensors and the tokenizer files)."
        )
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise HyVideoError(
            f"{what} folder {path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): "
            "copy the tokenizer files saved with the model into it."
        )
    return path


def load_model_part(model_class, folder: str | Path, what: str, dtype: torch.dtype, device="cpu", **kwargs):
    """`model_class` from `folder` straight onto `device`, where it is part of the model saved there
    (LLaVA without its LM head, Qwen2.5-VL's language model): the other weights are skipped unread.
    transformers logs each skipped key as a warning, expected here, so its loader is quiet during
    this load (and its tensor-parallel check, which a quiet loader runs and which warns of every
    layer it would not shard), and missing keys (which it would fill with random weights) raise a
    ValueError naming `what` instead. kwargs go to from_pretrained (e.g. quant/'s quantization_config)."""
    loggers = [logging.getLogger(f"transformers.{name}") for name in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        model, info = model_class.from_pretrained(folder, dtype=dtype, device_map={"": torch.device(device)},
                                                  local_files_only=True, output_loading_info=True, **kwargs)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    if info["missing_keys"]:
        raise ValueError(f"{what}'s weights are incomplete: {sorted(info['missing_keys'])[:3]} missing")
    return model.eval()


def load_llava_model(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu", **kwargs):
    """LLaVA as the I2V encoder runs it: `LlavaModel` (vision tower, projector, language model),
    without the LM head (1 GB at full size), which the states are taken before."""
    from transformers import LlavaModel

    return load_model_part(LlavaModel, folder, "LLaVA", dtype, device, **kwargs)


def _load_error(what: str, folder: Path, error: Exception) -> HyVideoError:
    reason = " ".join(str(error).split()).rstrip(".")  # one line, for the CLI
    return HyVideoError(
        f"could not load the {what} from {folder}: {reason}. The folder must hold a transformers model "
        "saved with save_pretrained (config.json, *.safetensors and the tokenizer files); re-download it."
    )


class LlamaTextEncoder:
    """The LLM encoder: template → tokens → hidden_states[-(skip_layers+1)] → crop.

    `model` is anything called like a transformers `LlamaModel` (input_ids, attention_mask,
    output_hidden_states=True → `.hidden_states`), `tokenizer` a transformers tokenizer that adds BOS
    and pads on the right. `device` is where inputs go (default: the model's device).
    """

    def __init__(self, model, tokenizer, text_len: int = TEXT_LEN, skip_layers: int = SKIP_LAYERS, device=None):
        if tokenizer.pad_token is None:
            # Any pad id works: padded positions come after the prompt and a causal LM never lets
            # earlier tokens see them; the mask marks them invalid for the DiT.
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.skip_layers = skip_layers
        self.device = torch.device(device) if device is not None else None
        self._crop_starts: dict[str, int] = {}

    @classmethod
    def from_folder(
        cls, folder: str | Path, dtype: torch.dtype = torch.float16, device="cpu",
        text_len: int = TEXT_LEN, skip_layers: int = SKIP_LAYERS, tokenizer_folder: str | Path | None = None,
    ) -> "LlamaTextEncoder":
        """Load the plain (unquantized) LLM from a `ckpts/text_encoder` folder; the tokenizer from
        the same folder (official layout) or from `tokenizer_folder` (diffusers' `tokenizer/`)."""
        from transformers import AutoModel, AutoTokenizer

        path = _check_folder(folder, "text encoder (LLM)", tokenizer=tokenizer_folder is None)
        tokenizer_path = path if tokenizer_folder is None else _check_folder(tokenizer_folder, "tokenizer (LLM)", model=False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, padding_side="right", local_files_only=True)
            # Straight onto `device`, shard by shard: never the whole 15 GB bf16 model in host RAM.
            model = AutoModel.from_pretrained(path, dtype=dtype, device_map={"": torch.device(device)}, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _load_error("text encoder (LLM)", path, error) from error
        return cls(model.eval(), tokenizer, text_len=text_len, skip_layers=skip_layers)

    def crop_start(self, template: str) -> int:
        if template not in self._crop_starts:
            self._crop_starts[template] = compute_crop_start(self.tokenizer, template)
        return self._crop_starts[template]

    def tokenize(self, prompts: str | Sequence[str], template: str):
        """Prompts in `template` -> (input_ids, mask [B, crop_start + text_len] on the model's device,
        truncated: list[bool]); `truncated[i]` is True when prompt i did not fit in text_len tokens
        and its end was cut off (the CLI warns about it)."""
        texts = [template.format(p) for p in _clean_prompts(prompts)]
        max_length = self.text_len + self.crop_start(template)
        truncated = [n > max_length for n in _token_counts(self.tokenizer, texts)]
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True,
            return_attention_mask=True, return_tensors="pt",
        )
        device = self.device or _model_device(self.model)
        # mask: 1 = token, 0 = right padding
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device), truncated

    def hidden_states(self, **inputs) -> torch.Tensor:
        """The model's hidden_states[-(skip_layers + 1)] [B, S, D]. hidden_states = (embeddings,
        layer 1 out, ..., layer N out [final-normed]); -(skip+1) is the output of layer N - skip,
        taken as is (no final norm), as in the official code."""
        with torch.no_grad():
            return self.model(**inputs, output_hidden_states=True).hidden_states[-(self.skip_layers + 1)]

    def encode(self, prompts: str | Sequence[str], template: str = PROMPT_TEMPLATE_VIDEO):
        """Encode prompts with `template`: (text_states [B, text_len, D] in the model's dtype,
        text_mask [B, text_len] int64, truncated: list[bool])."""
        input_ids, mask, truncated = self.tokenize(prompts, template)
        states = self.hidden_states(input_ids=input_ids, attention_mask=mask)  # [B, crop_start + text_len, D]
        crop_start = self.crop_start(template)
        return states[:, crop_start:], mask[:, crop_start:], truncated


def clip_image_processor_class():
    """LLaVA's CLIP image processor on PIL (as the official code ran it): transformers 5 picks a
    torchvision backend when torchvision is installed, whose resize differs slightly; its PIL class
    is `CLIPImageProcessorPil` (transformers 4's `CLIPImageProcessor` is the PIL one)."""
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil


class LlavaTextEncoder(LlamaTextEncoder):
    """The I2V encoder: LLaVA reads the image and the prompt in the I2V template (official
    `TextEncoder.encode` with `i2v_mode`; diffusers' `_get_llama_prompt_embeds`).

    `<image>` (one token of the template's system part: position 5 with Llama-3) is expanded to
    the vision tower's `image_tokens` positions (576 = 24 x 24 patches of 14 px at 336 px), which LLaVA fills with the projected patch embeddings. Of the
    hidden states, kept: the image positions, every `interleave`-th; then the prompt's positions from
    crop_start on, without the 4 assistant-header tokens before the final "\n\n" (which stays, as
    do the pads). The mask is 1 for the kept image states, then the prompt's mask.

    `model` is called like a transformers `LlavaModel` (input_ids with `image_tokens` image ids,
    attention_mask, pixel_values); `image_processor` is LLaVA's `CLIPImageProcessor`.
    """

    def __init__(self, model, tokenizer, image_processor, interleave: int, text_len: int = TEXT_LEN,
                 skip_layers: int = SKIP_LAYERS, device=None):
        super().__init__(model, tokenizer, text_len=text_len, skip_layers=skip_layers, device=device)
        self.image_processor = image_processor
        self.interleave = interleave
        config = model.config
        self.image_token_id = config.image_token_id
        vision = config.vision_config
        # CLIP patches, plus the class token unless LLaVA drops it ("default" strategy, as LLaVA-1.5)
        self.image_tokens = (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        self.end_header_id = tokenizer.convert_tokens_to_ids("<|end_header_id|>")

    @classmethod
    def from_folder(
        cls, folder: str | Path, image_condition_type: str, dtype: torch.dtype = torch.float16, device="cpu",
        text_len: int = TEXT_LEN, skip_layers: int = SKIP_LAYERS, tokenizer_folder: str | Path | None = None,
        image_processor_folder: str | Path | None = None, model=None,
    ) -> "LlavaTextEncoder":
        """Load LLaVA from `ckpts/text_encoder_i2v` (model, tokenizer and image processor in one
        folder, official layout) or diffusers' `text_encoder/` with `tokenizer/` and
        `image_processor/`. Only the LLaVA model runs (`load_llava_model`: no LM head, states are
        taken before it). `model`: that LlavaModel already loaded (e.g. with an NF4 language
        model), else loaded here in `dtype`."""
        from transformers import AutoTokenizer

        path = _check_folder(folder, "text encoder (LLaVA)", tokenizer=tokenizer_folder is None)
        tokenizer_path = path if tokenizer_folder is None else _check_folder(tokenizer_folder, "tokenizer (LLaVA)", model=False)
        processor_path = path if image_processor_folder is None else Path(image_processor_folder)
        if not (processor_path / "preprocessor_config.json").is_file():
            raise HyVideoError(f"{processor_path} has no preprocessor_config.json (LLaVA's CLIP image processor); re-download it")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, padding_side="right", local_files_only=True)
            image_processor = clip_image_processor_class().from_pretrained(processor_path, local_files_only=True)
            if model is None:
                model = load_llava_model(path, dtype, device)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _load_error("text encoder (LLaVA)", path, error) from error
        return cls(model.eval(), tokenizer, image_processor, IMAGE_EMBED_INTERLEAVE[image_condition_type],
                   text_len=text_len, skip_layers=skip_layers)

    def encode(self, prompts: str | Sequence[str], image, template: str = PROMPT_TEMPLATE_I2V):
        """Encode prompts with the (PIL, RGB) image: (text_states [B, image_tokens / interleave +
        text_len - 4, D], text_mask likewise, truncated: list[bool])."""
        input_ids, mask, truncated = self.tokenize(prompts, template)  # [B, L]
        batch, length = input_ids.shape
        crop_start, n = self.crop_start(template), self.image_tokens
        image_at = (input_ids[0] == self.image_token_id).nonzero().flatten().tolist()
        if len(image_at) != 1 or not (input_ids[:, image_at[0]] == self.image_token_id).all() or image_at[0] >= crop_start:
            raise ValueError(f"the template must hold one {IMAGE_TOKEN} before the prompt")
        start = image_at[0]
        pixels = self.image_processor(image, return_tensors="pt")["pixel_values"].to(input_ids.device)
        pixels = pixels.to(self.model.vision_tower.dtype).expand(batch, -1, -1, -1)  # [B, 3, 336, 336]
        states = self.hidden_states(  # [B, L + n - 1, D]: the image token became n positions
            input_ids=torch.cat([input_ids[:, :start], input_ids.new_full((batch, n), self.image_token_id), input_ids[:, start + 1 :]], 1),
            attention_mask=torch.cat([mask[:, :start], mask.new_ones(batch, n), mask[:, start + 1 :]], 1),
            pixel_values=pixels,
        )
        image_states = states[:, start : start + n : self.interleave]
        text_states, text_masks = [], []
        for row in range(batch):
            # The final "\n\n" follows the last <|end_header_id|> (the assistant's); a prompt cut
            # by truncation lost that header: then the last 4 tokens go instead (as official).
            headers = (input_ids[row] == self.end_header_id).nonzero().flatten().tolist()
            answer = headers[-1] + 1 if headers and headers[-1] >= crop_start else length
            cut = answer - ASSISTANT_HEADER_TOKENS
            shift = n - 1  # positions after the image token moved by n - 1
            text_states.append(torch.cat([states[row, crop_start + shift : cut + shift], states[row, answer + shift :]]))
            text_masks.append(torch.cat([mask[row, crop_start:cut], mask[row, answer:]]))
        image_mask = mask.new_ones(batch, image_states.shape[1])
        return torch.cat([image_states, torch.stack(text_states)], 1), torch.cat([image_mask, torch.stack(text_masks)], 1), truncated


class ClipTextEncoder:
    """The CLIP encoder: raw prompt → 77 tokens → pooled output (final-norm state at the first EOS)."""

    def __init__(self, model, tokenizer, max_length: int = CLIP_MAX_LENGTH, device=None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else None

    @classmethod
    def from_folder(
        cls, folder: str | Path, dtype: torch.dtype = torch.float16, device="cpu", tokenizer_folder: str | Path | None = None
    ) -> "ClipTextEncoder":
        """Load CLIP's text model from a `ckpts/text_encoder_2` folder; its tokenizer from the same
        folder or from `tokenizer_folder` (diffusers' `tokenizer_2/`)."""
        from transformers import AutoTokenizer, CLIPTextModel

        path = _check_folder(folder, "text encoder 2 (CLIP)", tokenizer=tokenizer_folder is None)
        tokenizer_path = path if tokenizer_folder is None else _check_folder(tokenizer_folder, "tokenizer 2 (CLIP)", model=False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
            model = CLIPTextModel.from_pretrained(path, dtype=dtype, device_map={"": torch.device(device)}, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _load_error("text encoder 2 (CLIP)", path, error) from error
        return cls(model.eval(), tokenizer)

    def encode(self, prompts: str | Sequence[str]):
        """Returns (text_states_2 [B, D2] in the model's dtype, truncated: list[bool])."""
        texts = _clean_prompts(prompts)
        truncated = [n > self.max_length for n in _token_counts(self.tokenizer, texts)]
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True,
            return_attention_mask=True, return_tensors="pt",
        )
        device = self.device or _model_device(self.model)
        with torch.no_grad():
            # The official code passes the mask (diffusers does not): same result, CLIP is causal
            # and pools at the first EOS, which never sees the padding after it.
            out = self.model(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
        return out.pooler_output, truncated  # [B, D2]


@dataclass
class TextEmbeddings:
    """Everything the DiT needs from the prompt (batch of B prompts)."""

    text_states: torch.Tensor  # [B, L, D] LLM states of the prompt tokens (L = text_len, D = 4096; I2V: image states first)
    text_mask: torch.Tensor  # [B, L] int64, 1 = prompt token, 0 = right padding
    text_states_2: torch.Tensor  # [B, D2] CLIP pooled (D2 = 768)
    truncated: list[bool]  # per prompt: cut to fit the LLM's text_len tokens
    truncated_2: list[bool]  # per prompt: cut to fit CLIP's 77 tokens (common for long prompts)


def encode_prompts(
    llm: LlamaTextEncoder, clip: ClipTextEncoder, prompts: str | Sequence[str], frames: int, image=None
) -> TextEmbeddings:
    """Encode prompts with both encoders; `frames` picks the template (1 → image template). With
    an image (PIL RGB, the uncropped conditioning image) `llm` is the LLaVA encoder and the I2V
    template is used (the official I2V sampler has no single-frame mode)."""
    if image is not None:
        text_states, text_mask, truncated = llm.encode(prompts, image)
    else:
        text_states, text_mask, truncated = llm.encode(prompts, template_for_frames(frames))
    text_states_2, truncated_2 = clip.encode(prompts)
    return TextEmbeddings(text_states, text_mask, text_states_2, truncated, truncated_2)
