"""`lowvram quantize`: build the quantize-once caches ahead of the first run, by the same rules a
run uses (`lowvram.stages.build_dit_cache` for the DiT, `quant.nf4` for the text encoder: the Llama,
LLaVA for image-to-video weights, Qwen2.5-VL for HunyuanVideo-1.5), so the run that follows finds them fresh.

    result = quantize_model(Path("ckpts"), "fp8", "blocks", only=None, cache_dir=None, reporter=reporter)
    result["dit"], result["encoder"]   # {"path", "found", "reason", ...} or {"skipped": why}
"""

from pathlib import Path

import torch

from hyvideo.checkpoint import find_model_files
from hyvideo.errors import HyVideoError
from hyvideo.v15_checkpoint import FAMILY as V15_FAMILY
from lowvram.progress import Reporter
from lowvram.stages import build_dit_cache, compute_dtypes, default_cache_dir, dit_config_for, run_device_for

PARTS = ("dit", "encoder")


def quantize_model(model_dir: Path, scheme: str, policy: str, only: str | None, cache_dir: Path | None,
                   reporter: Reporter, model: str | None = None) -> dict:
    """Build the DiT cache (`scheme`, `policy`) and the NF4 text encoder cache, or `only` one.
    model: which model in the folder (`hyvideo.checkpoint.find_model_files`; None: detected)."""
    if only not in (None, *PARTS):
        raise HyVideoError(f"--only takes dit or encoder, not {only!r}")
    files = find_model_files(model_dir, model=model)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(files)
    result = {"ok": True, "cache_dir": str(cache)}
    if only != "encoder":
        result["dit"] = _quantize_dit(files, scheme, policy, cache, only == "dit", reporter)
    if only != "dit":
        result["encoder"] = _quantize_encoder(files, cache, only == "encoder", reporter)
    return result


def _quantize_dit(files, scheme: str, policy: str, cache: Path, required: bool, reporter: Reporter) -> dict:
    from quant.cache import cache_paths

    if not files.dit_weights:
        if required:
            raise HyVideoError(f"{files.root} has only Tencent's FP8 DiT; it is already quantized (profiles load it directly)")
        return {"skipped": "only Tencent's FP8 DiT is here; it is already quantized"}
    config = dit_config_for(files)
    # In the dtype `generate` computes in, so that it finds this cache (lowvram.stages.run_device_for).
    dtype = compute_dtypes(run_device_for(files, config))[0]
    reporter.stage(f"DiT {scheme} ({policy})")
    status = build_dit_cache(files, config, scheme, policy, cache, dtype, reporter)
    return {"path": str(cache_paths(cache, scheme)[0]), "scheme": scheme, "policy": policy, "found": status.state,
            "reason": status.reason}


def _quantize_encoder(files, cache: Path, required: bool, reporter: Reporter) -> dict:
    """The NF4 cache of the Llama, of the LLaVA of image-to-video weights, or of HunyuanVideo-1.5's
    Qwen2.5-VL language model, as a run loads it."""
    from quant.nf4 import (
        LLAVA_CACHE_NAME, LLM_CACHE_NAME, NF4Unavailable, ensure_llm_nf4_cache, llm_cache_path, quantize_llava, quantize_llm,
        quantize_qwen,
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reporter.stage(f"text encoder NF4 ({device.type})")
    source = files.llm
    if files.family == V15_FAMILY:
        from hyvideo.v15_text import find_v15_text_files

        source, quantize, name = find_v15_text_files(files.root, files.layout).llm, quantize_qwen, LLM_CACHE_NAME
    elif files.image_to_video:
        quantize, name = quantize_llava, LLAVA_CACHE_NAME
    else:
        quantize, name = quantize_llm, LLM_CACHE_NAME
    try:
        status = ensure_llm_nf4_cache(source, cache, device, quantize=quantize, name=name)
    except NF4Unavailable as error:
        if required:
            raise HyVideoError(f"cannot build the NF4 text encoder cache: {error}; runs use the bf16 encoder instead") from None
        reporter.warn(f"NF4 text encoder not cached: {error} (runs use the bf16 encoder)")
        return {"skipped": str(error)}
    return {"path": str(llm_cache_path(cache, name)), "device": device.type, "found": status.state, "reason": status.reason}
