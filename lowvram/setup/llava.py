"""text_encoder/ from a LLaVA checkpoint: what the official preprocessing script
(hyvideo/utils/preprocess_text_encoder_tokenizer_utils.py, facts §4.1) does for
`xtuner/llava-llama-3-8b-v1_1-transformers`: keep the language model and the tokenizer, drop the
vision tower and projector (HunyuanVideo only encodes text).

The official script saved `model.language_model`, which in the transformers of its day was a
LlamaForCausalLM: the decoder *and* its LM head. The encoder loads the folder with AutoModel (the
head is skipped); `lowvram rewrite` needs the head to generate text.

The script loaded the whole 8B LLaVA into host RAM (~17 GB in fp16), more than a 16 GB machine
has. Here the tensors are copied shard by shard from read-only mapped files under the
LlamaForCausalLM names, in their stored dtype: the process holds one tensor at a time, the rest
is page cache the kernel can drop.
"""

import json
import shutil
from pathlib import Path

from hyvideo.errors import HyVideoError, one_line
from hyvideo.weight_io import read_safetensors, read_torch_file, write_safetensors_stream

# LLaVA's language-model tensors as transformers saves them: before v5 under `language_model.`
# (a LlamaForCausalLM), from v5 on as `model.language_model.` plus a top-level `lm_head`.
_DECODER_PREFIXES = ("language_model.model.", "model.language_model.")
_HEADS = ("language_model.lm_head.weight", "lm_head.weight")


def llm_name(name: str) -> str | None:
    """The LlamaForCausalLM name of a LLaVA tensor, or None for the vision tower and projector."""
    for prefix in _DECODER_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return "lm_head.weight" if name in _HEADS else None


def extract_language_model(llava_dir: Path, out_dir: Path) -> Path:
    """Save the LlamaForCausalLM inside the LLaVA checkpoint at `llava_dir`, in its stored dtype,
    with the tokenizer, as `out_dir`. Written to `<out_dir>.partial` and renamed when complete, so
    an interrupted extraction is never taken for a text encoder."""
    from transformers import AutoConfig, AutoTokenizer

    llava_dir, out_dir = Path(llava_dir), Path(out_dir)
    if not (llava_dir / "config.json").is_file():
        raise HyVideoError(f"no LLaVA checkpoint in {llava_dir} (no config.json); download it first (`lowvram download --source modelscope`)")
    shards = sorted(llava_dir.glob("*.safetensors")) or sorted(llava_dir.glob("*.bin"))  # older uploads: torch files
    try:
        config = AutoConfig.from_pretrained(llava_dir, local_files_only=True).text_config
        tokenizer = AutoTokenizer.from_pretrained(llava_dir, local_files_only=True)
        if not shards:
            raise OSError("no .safetensors or .bin weights")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise HyVideoError(f"cannot read the LLaVA checkpoint in {llava_dir} ({one_line(error)}); "
                           "download it again") from None
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        weight_map, dtype = {}, None
        for shard in shards:
            tensors = read_safetensors([shard]) if shard.suffix == ".safetensors" else read_torch_file(shard)
            kept = [(new, tensor) for name, tensor in tensors.items() if (new := llm_name(name))]
            if kept:
                file = shard.with_suffix(".safetensors").name
                layout = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in kept]
                write_safetensors_stream(partial / file, layout, kept, {"format": "pt"}, "the text encoder")
                weight_map.update((name, file) for name, _ in kept)
                dtype = dtype or kept[0][1].dtype
        if not weight_map:
            raise HyVideoError(f"the checkpoint in {llava_dir} has no language-model tensors; is it a LLaVA checkpoint?")
        if len({file for file in weight_map.values()}) > 1:
            (partial / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        else:  # one file: the name transformers looks for
            (partial / next(iter(weight_map.values()))).rename(partial / "model.safetensors")
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = dtype
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)
    except OSError as error:
        raise HyVideoError(f"cannot write {out_dir}: {error.strerror or error}; free some space and run the same command again") from None
    return out_dir
