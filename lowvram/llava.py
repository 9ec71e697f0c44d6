"""text_encoder/ from a LLaVA checkpoint: what the official preprocessing script
(hyvideo/utils/preprocess_text_encoder_tokenizer_utils.py, facts §4.1) does for
`xtuner/llava-llama-3-8b-v1_1-transformers`: keep the language model and the tokenizer, drop the
vision tower and projector (HunyuanVideo only encodes text).

The official script saved `model.language_model`, which in the transformers of its day was a
LlamaForCausalLM: the decoder *and* its LM head. transformers 5 splits them
(`model.model.language_model` is the decoder, `model.lm_head` the head), so both are put back into
one LlamaForCausalLM here. The encoder loads the folder with AutoModel (the head is skipped);
`lowvram rewrite` needs the head to generate text.
"""

import shutil
from pathlib import Path

from hyvideo.errors import HyVideoError


def extract_language_model(llava_dir: Path, out_dir: Path) -> Path:
    """Save the LlamaForCausalLM inside the LLaVA checkpoint at `llava_dir`, in its stored dtype,
    with the tokenizer, as `out_dir`. Written to `<out_dir>.partial` and renamed when complete, so
    an interrupted extraction is never taken for a text encoder. Holds the whole checkpoint in host
    RAM once (~17 GB for the 8B model in fp16), as the official script does."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    llava_dir, out_dir = Path(llava_dir), Path(out_dir)
    if not (llava_dir / "config.json").is_file():
        raise HyVideoError(f"no LLaVA checkpoint in {llava_dir} (no config.json); download it first (`lowvram download --source modelscope`)")
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype="auto", local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(llava_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HyVideoError(f"cannot read the LLaVA checkpoint in {llava_dir} ({' '.join(str(error).split())[:200]}); "
                           "download it again") from None
    with torch.device("meta"):  # a shell: its two children are replaced by LLaVA's own modules
        llm = LlamaForCausalLM(llava.config.text_config)
    llm.model, llm.lm_head = llava.model.language_model, llava.lm_head
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        llm.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)
    except OSError as error:
        raise HyVideoError(f"cannot write {out_dir}: {error.strerror or error}; free some space and run the same command again") from None
    return out_dir
