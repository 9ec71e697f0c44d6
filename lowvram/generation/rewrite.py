"""`--rewrite`: which LLM rewrites a run's prompt, how it is loaded, and the rewritten prompt kept
in the run (hyvideo/prompt_rewrite.py holds the instructions and the decoding).

The LLM is the official layout's text encoder by default: the LLaVA-Llama-3 language model saved
with its LM head (HunyuanVideo-1.5 in Tencent's layout: the whole Qwen2.5-VL-7B-Instruct, which
writes from text alone), loaded with its head (NF4 on the GPU where the profile runs the encoder in
NF4, as a 16 GB card cannot hold it in bf16 next to anything else). The diffusers layouts save the
encoder without its head (LlamaModel, Qwen2_5_VLTextModel), so there `--rewrite-model DIR` must name
a local causal LM.
Memory: the rewrite is the first thing of the text stage; its model is freed before the encoders
load.

The rewritten prompt is an output of the text stage, like the embeddings: it is stored in the
manifest with its sha256 (`Run.save_rewritten_prompt`) and a resume reuses it, never rewriting
again. The settings keep what decides it: the mode and the --rewrite-model folder.
"""

import json
from pathlib import Path

import torch

from hyvideo.checkpoint import ModelFiles, find_model_files
from hyvideo.errors import HyVideoError, one_line
from hyvideo.prompt_rewrite import check_mode, rewrite_prompt, writer_class, writes_text
from lowvram.progress import Reporter
from lowvram.streaming import empty_cache

from .run_folder import Run


def rewrite_folders(files: ModelFiles | None, rewrite_model: Path | None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of the rewrite LLM: --rewrite-model, else the text encoder.
    Checked before any compute: it must be a transformers causal LM (its config's architectures)."""
    if rewrite_model is not None:
        folder = tokenizer = Path(rewrite_model)
    else:
        folder, tokenizer = files.llm, files.llm_tokenizer
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as error:
        raise HyVideoError(f"--rewrite-model {folder} is not a transformers model folder (config.json: "
                           f"{getattr(error, 'strerror', None) or error}); pass a folder saved with save_pretrained") from None
    if not writes_text(architectures):
        if rewrite_model is None:
            raise HyVideoError(f"the text encoder in {folder} has no LM head to write with ({', '.join(architectures) or 'no architectures'}; "
                               "diffusers' layouts save none, the 13B image-to-video's is a LLaVA), so it cannot write a prompt; pass "
                               "--rewrite-model DIR, a local causal LM folder (e.g. a text-to-video official layout's text_encoder/, "
                               "or HunyuanVideo-1.5's text_encoder/llm/ from Tencent's layout)")
        raise HyVideoError(f"--rewrite-model {folder} is not a causal language model ({', '.join(architectures) or 'no architectures'}); "
                           "pass a folder of a *ForCausalLM model (or Qwen2.5-VL-Instruct)")
    return folder, tokenizer


def rewrite_settings(mode: str | None, files: ModelFiles, rewrite_model: Path | None) -> dict | None:
    """What the run's settings record: the mode and an explicit --rewrite-model (None: the encoder)."""
    if mode is None:
        if rewrite_model is not None:
            raise HyVideoError("--rewrite-model needs --rewrite normal or --rewrite master")
        return None
    check_mode(mode)
    rewrite_folders(files, rewrite_model)
    return {"mode": mode, "model": str(Path(rewrite_model).resolve()) if rewrite_model else None}


def load_rewriter(folder: Path, tokenizer_folder: Path, device: torch.device, dtype: torch.dtype, nf4: bool,
                  reporter: Reporter):
    """(causal LM, tokenizer): NF4 linears on `device` when `nf4` (quant/nf4.py; where bitsandbytes
    cannot run it, bf16 on the CPU with a warning, as the encoder's fallback), else `dtype`."""
    from transformers import AutoTokenizer

    from quant.nf4 import load_llm_nf4

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        if not nf4:
            model = writer_class(folder).from_pretrained(folder, dtype=dtype, device_map={"": device}, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HyVideoError(f"could not load the rewrite model from {folder}: {one_line(error)}") from None
    if nf4:
        loaded = load_llm_nf4(folder, device, causal=True)
        if loaded.reason:
            reporter.warn(f"NF4 unavailable for the rewrite model ({loaded.reason}); running it in bf16 on the CPU")
        model = loaded.model
    return model.eval(), tokenizer


def rewrite_with(folder: Path, tokenizer_folder: Path, prompt: str, mode: str, device: torch.device, dtype: torch.dtype,
                 nf4: bool, reporter: Reporter) -> str:
    """Load, rewrite, free."""
    reporter.stage(f"rewriting prompt ({mode})")
    model, tokenizer = load_rewriter(folder, tokenizer_folder, device, dtype, nf4, reporter)
    try:
        return rewrite_prompt(model, tokenizer, prompt, mode)
    finally:
        del model
        empty_cache(device)


def prompt_for_encoding(run: Run, files: ModelFiles, device: torch.device, dtype: torch.dtype, nf4: bool,
                        reporter: Reporter) -> str:
    """The prompt the text encoders read: the user's, or its rewrite (made once, kept in the run)."""
    settings = run.settings
    rewrite = settings.get("rewrite")
    if not rewrite:
        return settings["prompt"]
    prompt = run.rewritten_prompt
    if prompt is None:
        folder, tokenizer = rewrite_folders(files, Path(rewrite["model"]) if rewrite["model"] else None)
        prompt = rewrite_with(folder, tokenizer, settings["prompt"], rewrite["mode"], device, dtype, nf4, reporter)
        run.save_rewritten_prompt(prompt)
    reporter.rewritten(prompt)
    return prompt


def rewrite_only(prompt: str, mode: str, model_dir: Path | None, rewrite_model: Path | None, device: torch.device,
                 reporter: Reporter) -> str:
    """`lowvram rewrite`: the rewritten prompt alone (NF4 on a GPU, the compute dtype on the CPU)."""
    from lowvram.stages import compute_dtypes

    check_mode(mode)
    if not prompt or not prompt.strip():
        raise HyVideoError("the prompt is empty: give a prompt text")
    files = find_model_files(Path(model_dir)) if rewrite_model is None else None
    folder, tokenizer = rewrite_folders(files, rewrite_model)
    return rewrite_with(folder, tokenizer, prompt, mode, device, compute_dtypes(device)[0], device.type == "cuda", reporter)
