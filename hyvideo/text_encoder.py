"""Prompt → text embeddings for the DiT: the LLM (text_states) and CLIP (text_states_2), facts §4.

HunyuanVideo conditions on two encodings of the prompt:

- `text_states` [B, 256, 4096]: the prompt, wrapped in a fixed chat template, run through the
  LLaVA-Llama-3-8B language model; the hidden states *before* the last two decoder layers
  (`hidden_states[-3]`, no final norm), with the template's system part cut off (`crop_start`
  tokens), plus the matching attention mask (1 = prompt token, right padded).
- `text_states_2` [B, 768]: CLIP-L's pooled output of the raw prompt (77 tokens).

The encoders wrap already-built transformers objects, so a caller can pass a model it built itself
(e.g. a 4-bit quantized LLM, or one streamed layer by layer); `from_folder` builds the plain ones
from the official checkpoint folders (`ckpts/text_encoder`, `ckpts/text_encoder_2`).
"""

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

# What compute_crop_start gives for the real Llama-3 tokenizer (the official code hard-codes these).
OFFICIAL_CROP_START = {PROMPT_TEMPLATE_VIDEO: 95, PROMPT_TEMPLATE_IMAGE: 36}

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

    def encode(self, prompts: str | Sequence[str], template: str = PROMPT_TEMPLATE_VIDEO):
        """Encode prompts with `template`.

        Returns (text_states [B, text_len, D] in the model's dtype, text_mask [B, text_len] int64,
        truncated: list[bool]); `truncated[i]` is True when prompt i did not fit in text_len tokens
        and its end was cut off (the CLI warns about it).
        """
        texts = [template.format(p) for p in _clean_prompts(prompts)]
        crop_start = self.crop_start(template)
        max_length = self.text_len + crop_start

        truncated = [n > max_length for n in _token_counts(self.tokenizer, texts)]

        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True,
            return_attention_mask=True, return_tensors="pt",
        )
        device = self.device or _model_device(self.model)
        input_ids = tokens["input_ids"].to(device)  # [B, crop_start + text_len]
        mask = tokens["attention_mask"].to(device)  # [B, crop_start + text_len], 1 = token, 0 = pad
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        # hidden_states = (embeddings, layer 1 out, ..., layer N out [final-normed]); -(skip+1) is the
        # output of layer N - skip, taken as is (no final norm), as in the official code.
        states = out.hidden_states[-(self.skip_layers + 1)]  # [B, crop_start + text_len, D]
        return states[:, crop_start:], mask[:, crop_start:], truncated


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

    text_states: torch.Tensor  # [B, L, D] LLM states of the prompt tokens (L = text_len, D = 4096)
    text_mask: torch.Tensor  # [B, L] int64, 1 = prompt token, 0 = right padding
    text_states_2: torch.Tensor  # [B, D2] CLIP pooled (D2 = 768)
    truncated: list[bool]  # per prompt: cut to fit the LLM's text_len tokens
    truncated_2: list[bool]  # per prompt: cut to fit CLIP's 77 tokens (common for long prompts)


def encode_prompts(
    llm: LlamaTextEncoder, clip: ClipTextEncoder, prompts: str | Sequence[str], frames: int
) -> TextEmbeddings:
    """Encode prompts with both encoders; `frames` picks the template (1 → image template)."""
    text_states, text_mask, truncated = llm.encode(prompts, template_for_frames(frames))
    text_states_2, truncated_2 = clip.encode(prompts)
    return TextEmbeddings(text_states, text_mask, text_states_2, truncated, truncated_2)
