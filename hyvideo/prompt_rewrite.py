"""Prompt rewriting: a local instruction-following LLM turns a short user prompt into the kind of
description HunyuanVideo was trained on, before it is encoded.

HunyuanVideo's README describes two modes for its (Hunyuan-Large based) rewrite model: "normal"
makes the user's intent clear to the video model, "master" also describes composition, lighting and
camera movement for a more striking shot, at the risk of losing some detail. The instructions below
are this project's own wording of those two modes. By default the LLM is LLaVA-Llama-3-8B's
language model, the same weights as the text encoder (the official layout keeps its LM head).

Greedy decoding, so the same prompt, mode and model always give the same rewrite; at most
`MAX_NEW_TOKENS` new tokens, which is the whole of what the DiT reads (256 LLM tokens of prompt).
"""

import json
from pathlib import Path

import torch

from .errors import HyVideoError

MODES = ("normal", "master")
MAX_NEW_TOKENS = 256  # the text encoder keeps 256 tokens of prompt; a longer rewrite would be cut

_ANSWER = ("Write the rewritten description in the same language as the user's description. Answer with the "
           "rewritten description only: no introduction, no explanation, no quotation marks.")

INSTRUCTIONS = {
    "normal": (
        "You rewrite descriptions for a text-to-video model. Rewrite the user's description so that it says "
        "clearly and concretely what the video shows: the subjects, how they look, what they do and where. "
        "Keep every subject, action, detail, name, style word and technical term of the original; do not add "
        "new subjects or events. If the description is only a word or two, describe the basic look of that "
        "subject in one or two short sentences. " + _ANSWER
    ),
    "master": (
        "You rewrite descriptions for a text-to-video model, as a cinematographer would brief a shot. Keep "
        "every subject, action, detail, name, style word and technical term of the user's description, then "
        "describe what makes it a beautiful shot: the composition and framing, the lighting (its source, "
        "direction, colour and mood), the atmosphere and the style, and the camera's angle and movement "
        "(static, pan, tilt, dolly, tracking, aerial ...). Where the description gives no style, lighting or "
        "setting, choose ones that suit it. Write one paragraph of at most 120 words. " + _ANSWER
    ),
}

# Models that can write the rewrite: any transformers causal LM, and the instruction-tuned
# vision-language model whose language model is HunyuanVideo-1.5's text encoder (Tencent's
# text_encoder/llm/ is the whole Qwen2.5-VL-7B-Instruct, head included; it writes from text alone).
VISION_LANGUAGE_WRITERS = ("Qwen2_5_VLForConditionalGeneration",)


def writes_text(architectures: list[str]) -> bool:
    """Whether a model of these transformers `architectures` (its config's) can write a prompt."""
    return any(name.endswith("ForCausalLM") or name in VISION_LANGUAGE_WRITERS for name in architectures)


def writer_class(folder: Path):
    """The transformers auto class that loads the model saved in `folder` with its head."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    return AutoModelForImageTextToText if any(name in VISION_LANGUAGE_WRITERS for name in architectures) else AutoModelForCausalLM


# Llama-3's chat format (the format of the encoder's own prompt template), for a tokenizer saved
# without a chat template of its own.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen's chat format (ChatML), for a Qwen tokenizer saved without its chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise HyVideoError(f"--rewrite must be normal or master, not {mode!r}")
    return mode


def rewrite_messages(prompt: str, mode: str) -> list[dict]:
    """The chat the LLM answers: the mode's instructions as the system turn, the prompt as the user's."""
    return [{"role": "system", "content": INSTRUCTIONS[check_mode(mode)]}, {"role": "user", "content": prompt.strip()}]


def chat_input_ids(tokenizer, prompt: str, mode: str) -> torch.Tensor:
    """[1, L] token ids of the chat, ending with the assistant header the answer follows."""
    fallback = CHATML_TEMPLATE if "<|im_start|>" in tokenizer.get_vocab() else LLAMA3_CHAT_TEMPLATE
    template = tokenizer.chat_template or fallback
    encoded = tokenizer.apply_chat_template(rewrite_messages(prompt, mode), chat_template=template,
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return encoded["input_ids"]


@torch.inference_mode()
def rewrite_prompt(model, tokenizer, prompt: str, mode: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The rewritten prompt: greedy decoding of `model` (a transformers model that `writes_text`)
    until its end of turn, end of text, or `max_new_tokens`."""
    input_ids = chat_input_ids(tokenizer, prompt, mode).to(model.device)
    vocab = tokenizer.get_vocab()
    stop = [i for i in (tokenizer.eos_token_id, vocab.get("<|eot_id|>"), vocab.get("<|im_end|>")) if i is not None]
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=stop, pad_token_id=stop[0] if stop else None)
    text = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip().strip('"').strip()
    if not text:
        raise HyVideoError("the rewrite model answered with an empty prompt; run without --rewrite, or pass another --rewrite-model")
    return text
