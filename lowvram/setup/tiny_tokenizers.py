"""Tiny tokenizers of the same *kind* as the real ones, built offline, for synthetic model folders
(`lowvram.setup.synthetic_checkpoint`): the real Llama-3 and CLIP-L vocabularies cannot be downloaded here.

- `build_tiny_llama3_tokenizer`: byte-level BPE with Llama-3's pre-tokenizer regex, its special tokens
  (`<|begin_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`, ...) and a
  post-processor that adds BOS; its merges are learnt in code from a small built-in corpus.
- `build_tiny_clip_tokenizer`: a `CLIPTokenizer` (same normaliser / pre-tokeniser / `</w>` BPE as
  CLIP-L) with a BPE vocabulary learnt from the same corpus.

Both are deterministic: the same arguments always give the same vocabulary and token ids, and the ids
stay far below the real vocabulary sizes, so they also drive full-size synthetic models.
"""

from collections import Counter

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

# Llama-3's pre-tokenizer split (from Meta's tokenizer.py / HF tokenizer.json).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Llama-3 special tokens the prompt templates use, plus EOS and the pad token. Real Llama-3 has
# 256 special tokens after its 128,000 BPE ranks; a tiny model only needs these.
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"
LLAMA3_PAD = "<|finetune_right_pad_id|>"
LLAMA3_SPECIAL_TOKENS = (
    LLAMA3_BOS, LLAMA3_EOS, LLAMA3_PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)

# CLIPTokenizer's split regex, less its special-token alternatives (the corpus has none).
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"  # also CLIP's pad and unknown token

# Training text for the tiny BPE vocabularies: the template wording (so the templates tokenize into
# merged words, as with the real tokenizer) and some typical video prompts.
TINY_CORPUS = (
    "system\n\nDescribe the video by detailing the following aspects: 1. The main content and theme of "
    "the video.2. The color, shape, size, texture, quantity, text, and spatial relationships of the "
    "objects.3. Actions, events, behaviors temporal relationships, physical movement changes of the "
    "objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and "
    "transitions used in the video:",
    "system\n\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "user\n\n",
    "A cat walks on the grass, realistic style.",
    "A dog runs along the beach at sunset, the camera follows it slowly.",
    "Close-up of a red flower in the rain, soft light, shallow depth of field.",
    "An astronaut rides a horse on the moon, cinematic, 4k.",
    "Two people talk in a busy street at night, neon lights and reflections.",
    "A small boat sails across a calm blue lake surrounded by green mountains.",
)


def learn_bpe_merges(words: list[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE training: repeatedly merge the most frequent adjacent symbol pair.

    Written out here (instead of `tokenizers`' BpeTrainer) because the trainer breaks ties between
    equally frequent pairs differently from run to run; here ties go to the smallest pair, so the
    vocabulary, and so the token ids, are the same every time.
    """
    counts = Counter(words)  # word (as a tuple of symbols) -> occurrences
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in counts.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, n in counts.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += n
        counts = merged
    return merges


def _bpe_vocab(alphabet: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for symbol in alphabet + [left + right for left, right in merges]:
        vocab.setdefault(symbol, len(vocab))
    return vocab


def build_tiny_llama3_tokenizer(num_merges: int = 250) -> PreTrainedTokenizerFast:
    """A Llama-3-shaped tokenizer with BPE merges learnt from `TINY_CORPUS`.

    As Llama-3's: byte-level BPE over the 256 byte symbols (any text encodes, nothing is unknown),
    Llama-3's split regex, the special tokens as added tokens after the BPE vocabulary, BOS
    prepended by the post-processor. Right padding with a dedicated pad token.
    """
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    words = [tuple(piece) for text in TINY_CORPUS for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
    merges = learn_bpe_merges(words, num_merges)

    tok = Tokenizer(models.BPE(_bpe_vocab(sorted(pre_tokenizers.ByteLevel.alphabet()), merges), merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A {LLAMA3_BOS} $B",
        special_tokens=[(LLAMA3_BOS, tok.token_to_id(LLAMA3_BOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=LLAMA3_BOS, eos_token=LLAMA3_EOS, pad_token=LLAMA3_PAD,
        padding_side="right", model_max_length=100_000,
    )


def build_tiny_clip_tokenizer(num_merges: int = 200) -> CLIPTokenizer:
    """A `CLIPTokenizer` (lower-casing, CLIP split regex, byte-level BPE with `</w>` word ends,
    `<|startoftext|>` ... `<|endoftext|>` around the text, max length 77) whose merges are learnt
    from `TINY_CORPUS`.

    Vocabulary layout as in CLIP-L: the 256 byte symbols, the same with `</w>`, the merges, then the
    two special tokens last (so EOS has the highest id, as in the real model).
    """
    # Learn merges on words as CLIPTokenizer sees them: normalised (NFC, one space, lower case),
    # split by CLIP's regex, byte-level symbols, the last one marked as a word end with "</w>".
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    words = []
    for text in TINY_CORPUS:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            words.append(tuple(piece[:-1]) + (piece[-1] + "</w>",))
    merges = learn_bpe_merges(words, num_merges)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = _bpe_vocab(alphabet + [symbol + "</w>" for symbol in alphabet], merges)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_llava_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny Llama-3 tokenizer as LLaVA's: `<image>` added as a special token, and "assistant"
    whole, as in Llama-3's vocabulary (so the I2V template's assistant header is the 4 tokens the
    official code cuts; the tiny BPE alone splits "assistant" into 6)."""
    from tokenizers import AddedToken

    from hyvideo.text_encoder import IMAGE_TOKEN

    tokenizer = build_tiny_llama3_tokenizer()
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_tokens([AddedToken("assistant", normalized=False)])
    return tokenizer


# Qwen2's pre-tokenizer split (Qwen2Tokenizer's PRETOKENIZE_REGEX): as Llama-3's, but one digit a piece.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, and the chat turn markers
# Qwen2.5-VL's chat template for text-only messages (its image/video branches left out): a default
# system turn when none is given, `<|im_start|>role\n...<|im_end|>\n` per turn, the assistant header.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen2.5-VL-shaped tokenizer: byte-level BPE with Qwen2's split regex and NFC, no BOS,
    `<|endoftext|>` as pad, `<|im_start|>`/`<|im_end|>` as special tokens, the chat template.

    Its merges are learnt from HunyuanVideo-1.5's system message (hyvideo/v15_text.py) and
    `TINY_CORPUS` until no pair is left, so every pre-tokenized piece of the system turn is one
    token, as in the real 151k vocabulary: the template's prefix is then the real 108 tokens
    (diffusers' hard-coded crop), which the text-encoder tests rely on."""
    from hyvideo.v15_text import SYSTEM_MESSAGE

    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    corpus = ("system\n" + SYSTEM_MESSAGE, "user\n", "assistant\n", *TINY_CORPUS)
    words = [tuple(piece) for text in corpus for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
    merges = learn_bpe_merges(words, num_merges=100_000)  # stops when every word is one symbol

    tok = Tokenizer(models.BPE(_bpe_vocab(sorted(pre_tokenizers.ByteLevel.alphabet()), merges), merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right",
        model_max_length=131_072, chat_template=QWEN2_CHAT_TEMPLATE,
    )
