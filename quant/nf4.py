"""The LLM text encoder (Llama-3-8B, facts §4.1) in 4-bit NF4 through transformers + bitsandbytes.

At bf16 the encoder takes 15 GB, as much as the whole FP8 DiT; NF4 with double quantization
(`bytes.llm_nf4_bytes`: ~4.65 GB) lets it sit on a 16 GB GPU next to the activations, or run at all
on a 12 GB one. It only runs once per prompt, so its extra error (4-bit weights, bf16 compute) is
paid once, not per denoising step. CLIP-L is small (0.25 GB) and stays fp16/bf16.

bitsandbytes is optional and its kernels may not run on every machine (no CUDA build, an old GPU,
no CPU backend, layer shapes a kernel does not support). `load_llm_nf4` therefore probes the backend
on the target device with a tiny 4-bit quantize + matmul, loads the model, and runs two tokens
through it; if anything fails it loads the plain bf16 encoder on the CPU instead and says why
(`LLMLoad.reason`), so the caller can keep it on the CPU or offload it. No traceback
reaches the user for a missing or broken bitsandbytes; a broken model folder is a HyVideoError.

Quantize once: given a cache folder, the NF4 model is saved after its first quantization
(transformers + bitsandbytes serialize 4-bit weights with their quant states) into
`<cache_dir>/llm-nf4/` and loaded from there, ~4.7 GB read instead of 16 GB read and quantized.
All three encoders go through that one cache (`ensure_llm_nf4_cache`), each saying how its source
loads in NF4: the Llama (`load_llm_nf4`), HunyuanVideo-1.5's Qwen2.5-VL language model
(`load_qwen_text_nf4`, `llm-nf4/` of its own cache folder) and image-to-video's LLaVA
(`load_llava_nf4`, in `llava-nf4/`: one ckpts/ folder may hold both 13B releases and one cache).
The rules are the DiT cache's (quant/cache.py): a JSON header (`hyvideo-cache.json`) holds the
source fingerprint (config + weight files), the quantization settings, the torch / transformers /
bitsandbytes versions and every cached file's size and sha256. A changed source, setting, format
or transformers / bitsandbytes version (they define the saved format) makes it stale; a wrong size
or checksum makes it corrupt; both are rebuilt. A build is written into a temp folder, the header
last, then renamed into place, so an interrupted build is never taken for a cache.
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from hyvideo.errors import HyVideoError, one_line
from hyvideo.prompt_rewrite import writer_class
from hyvideo.files import file_fingerprint, fsync_dir, remove_dead_temps, temp_path, write_atomic

from .cache import CacheStatus, file_sha256

LLM_CACHE_FORMAT = 1
LLM_CACHE_HEADER = "hyvideo-cache.json"
LLM_CACHE_NAME = "llm-nf4"  # the cache's folder in the cache dir (the Llama's; 1.5's Qwen in its own cache dir)
LLAVA_CACHE_NAME = "llava-nf4"  # image-to-video's LLaVA


@dataclass
class LLMLoad:
    """What `load_llm_nf4` produced: the model, "nf4" or "bf16", and why NF4 was not used."""

    model: nn.Module
    scheme: str
    reason: str | None = None
    device: torch.device = torch.device("cpu")


class NF4Unavailable(HyVideoError):
    """bitsandbytes cannot run (or save) this model in NF4 here; the message says why.
    `load_llm_nf4` turns it into the bf16 fallback."""


def nf4_unavailable_reason(device: "torch.device | str") -> str | None:
    """None if bitsandbytes can quantize to NF4 and multiply on `device`, else why not."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError as error:
        return f"bitsandbytes is not installed (pip install bitsandbytes): {one_line(error)}"
    except Exception as error:  # a broken install raises anything at import time
        return f"bitsandbytes failed to load: {one_line(error)}"
    try:
        weight = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        x = torch.randn(2, 64, device=device, dtype=torch.bfloat16)
        out = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        if out.shape != (2, 64) or not torch.isfinite(out).all():
            return f"bitsandbytes 4-bit matmul gives wrong results on {device}"
    except Exception as error:  # backend failures surface as many exception types (runtime, assertion, unsupported op)
        return f"bitsandbytes cannot run NF4 on {device}: {one_line(error)}"
    return None


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16):
    """NF4 weights, double-quantized statistics, bf16 matmuls."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _check_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise HyVideoError(f"text encoder (LLM) folder {path} has no config.json: download or convert the LLM into it")
    return path


def _auto_class(causal: bool, folder: Path):
    """AutoModel (the encoder: the Llama without its LM head) or, for `--rewrite`, the model with
    its head as `hyvideo.prompt_rewrite.writer_class` says (a causal LM, or Qwen2.5-VL-Instruct)."""
    from transformers import AutoModel

    return writer_class(folder) if causal else AutoModel


def load_llm_bf16(folder: str | Path, device: "torch.device | str" = "cpu", causal: bool = False) -> nn.Module:
    """The plain encoder (or with `causal`, the LM with its head) in bf16."""
    path = _check_folder(folder)
    try:
        model = _auto_class(causal, path).from_pretrained(path, dtype=torch.bfloat16, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HyVideoError(f"could not load the text encoder (LLM) from {path}: {one_line(error)}") from error
    return model.to(device).eval()


def _device(device: "torch.device | str") -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def _load_nf4(folder: Path, device: torch.device, quantize: bool, causal: bool = False) -> nn.Module:
    """AutoModel (or the causal LM) with NF4 linears on `device`: quantized from the bf16 encoder
    folder, or (quantize=False) a saved NF4 model (the cache) as it is, without quantizing again."""
    extra = {"quantization_config": nf4_config()} if quantize else {}
    try:
        model = _auto_class(causal, Path(folder)).from_pretrained(folder, dtype=torch.bfloat16, device_map={"": device}, local_files_only=True, **extra)
    except (OSError, KeyError) as error:
        raise HyVideoError(f"could not load the text encoder (LLM) from {folder}: {one_line(error)}") from error
    except Exception as error:  # transformers' bitsandbytes checks (versions, devices) raise various types
        raise NF4Unavailable(f"transformers could not load it in NF4: {one_line(error)}") from error
    return model.eval()


def load_llm_nf4(folder: str | Path, device: "torch.device | str" = "cuda", cache_dir: str | Path | None = None,
                 on_status: Callable[[CacheStatus], None] | None = None, causal: bool = False) -> LLMLoad:
    """The LLM encoder with NF4 linears on `device`, or (with the reason) the bf16 one on the CPU.

    With `cache_dir`, the NF4 model comes from its cache there, built first if needed
    (`ensure_llm_nf4_cache`; `on_status` hears about a build). Embeddings and norms stay bf16
    (transformers quantizes only nn.Linear; in a causal LM the head stays bf16 too). `causal`:
    the LM with its head (`--rewrite`), quantized on load; the cache holds the encoder only."""
    if causal and cache_dir is not None:
        raise ValueError("the NF4 cache holds the encoder without its LM head; load the causal LM without cache_dir")
    device, path = _device(device), _check_folder(folder)

    def quantize(folder: Path, quantize_device: torch.device) -> nn.Module:
        return _load_nf4(folder, quantize_device, quantize=True, causal=causal)

    return _nf4_or_bf16(lambda: _cached_or_quantized(path, device, cache_dir, on_status, quantize, LLM_CACHE_NAME),
                        lambda: load_llm_bf16(path, "cpu", causal), device)


def quantize_llm(folder: Path, device: torch.device) -> nn.Module:
    """The Llama encoder (AutoModel), quantized to NF4 on `device` while it loads."""
    return _load_nf4(folder, device, quantize=True)


def _cached_or_quantized(path: Path, device: torch.device, cache_dir: str | Path | None,
                         on_status: Callable[[CacheStatus], None] | None,
                         quantize: Callable[[Path, torch.device], nn.Module], name: str) -> nn.Module:
    """The one rule of the three encoders' NF4 loads: without `cache_dir` quantized on load
    (`quantize`), else from the cache `name` there, built first if needed (`ensure_llm_nf4_cache`)."""
    if cache_dir is None:
        _require_nf4(device)
        return quantize(path, device)
    ensure_llm_nf4_cache(path, cache_dir, device, on_status, quantize, name)
    return _load_nf4(llm_cache_path(cache_dir, name), device, quantize=False)


def _require_nf4(device: torch.device) -> None:
    reason = nf4_unavailable_reason(device)
    if reason is not None:
        raise NF4Unavailable(reason)


def _nf4_or_bf16(load_nf4: Callable[[], torch.nn.Module], load_bf16: Callable[[], torch.nn.Module], device: torch.device) -> LLMLoad:
    """The one fallback rule of the encoders: the NF4 model if it loads and passes the smoke test
    on `device`, else the bf16 one on the CPU with the reason."""
    try:
        model = load_nf4()
        reason = _smoke_test(model, device)
        if reason is None:
            return LLMLoad(model, "nf4", None, device)
        del model
    except NF4Unavailable as error:
        reason = str(error)
    return LLMLoad(load_bf16(), "bf16", reason, torch.device("cpu"))


# Kept 16-bit: LlavaModel's module names, which transformers matches from the start ("vision_tower"
# does not match LlavaForConditionalGeneration's "model.vision_tower...": that one would quantize
# the vision tower and projector too). They decide what `llava-nf4/` holds: a change needs a new
# LLM_CACHE_FORMAT.
LLAVA_16BIT_MODULES = ["vision_tower", "multi_modal_projector"]


def _load_text_model(load: Callable[..., nn.Module], what: str, path: Path, device: "torch.device | str", **extra) -> nn.Module:
    """`load(path, bf16, device, **extra)`; a broken folder is a HyVideoError naming `what`, and
    any other failure while quantizing (`extra`) NF4Unavailable, as `_load_nf4`."""
    broken = (OSError, KeyError) if extra else (OSError, ValueError, KeyError, TypeError)
    try:
        return load(path, torch.bfloat16, device, **extra)
    except broken as error:
        raise HyVideoError(f"could not load the text encoder ({what}) from {path}: {one_line(error)}") from error
    except Exception as error:  # transformers' bitsandbytes checks (versions, devices) raise various types
        if not extra:
            raise
        raise NF4Unavailable(f"transformers could not load it in NF4: {one_line(error)}") from error


def quantize_llava(folder: Path, device: torch.device) -> nn.Module:
    """LLaVA's `LlavaModel` with its language model's linears quantized to NF4 on `device` while it
    loads, the vision tower and projector bf16, the LM head not read: what its cache holds."""
    from hyvideo.text_encoder import load_llava_model

    config = nf4_config()
    config.llm_int8_skip_modules = LLAVA_16BIT_MODULES
    return _load_text_model(load_llava_model, "LLaVA", folder, device, quantization_config=config)


def load_llava_nf4(folder: str | Path, device: "torch.device | str" = "cuda", cache_dir: str | Path | None = None,
                   on_status: Callable[[CacheStatus], None] | None = None) -> LLMLoad:
    """Image-to-video's LLaVA as a `LlavaModel` (no LM head: the encoder takes states before it),
    its language model's linears in NF4 on `device` and the vision tower and projector bf16 beside
    it (`quantize_llava`); or (with the reason) all of it in bf16 on the CPU, as `load_llm_nf4`.
    With `cache_dir`, through the same quantize-once cache (`llava-nf4/` there: the saved NF4
    LlavaModel, ~5.3 GB at full size by quant/bytes.py's count: the NF4 language model and the
    0.65 GB bf16 vision tower and projector, read instead of 15.7 GB read and quantized)."""
    from hyvideo.text_encoder import load_llava_model

    device, path = _device(device), _check_folder(folder)
    return _nf4_or_bf16(lambda: _cached_or_quantized(path, device, cache_dir, on_status, quantize_llava, LLAVA_CACHE_NAME),
                        lambda: _load_text_model(load_llava_model, "LLaVA", path, "cpu"), device)


def load_qwen_text_nf4(folder: str | Path, device: "torch.device | str" = "cuda", cache_dir: str | Path | None = None,
                       on_status: Callable[[CacheStatus], None] | None = None) -> LLMLoad:
    """HunyuanVideo-1.5's text encoder, Qwen2.5-VL-7B's language model (`Qwen2_5_VLTextModel`,
    from diffusers' `text_encoder/` or Tencent's whole `text_encoder/llm/`, whose vision tower and
    LM head are not read), with NF4 linears on `device`; or (with the reason) in bf16 on the CPU,
    as `load_llm_nf4`. With `cache_dir`, through the same quantize-once cache (`llm-nf4/` there:
    the saved NF4 language model alone, ~4.5 GB instead of 16.6 GB read and quantized)."""
    from hyvideo.v15_text import load_qwen_text_model

    device, path = _device(device), _check_folder(folder)
    return _nf4_or_bf16(lambda: _cached_or_quantized(path, device, cache_dir, on_status, quantize_qwen, LLM_CACHE_NAME),
                        lambda: _load_text_model(load_qwen_text_model, "Qwen2.5-VL", path, "cpu"), device)


def quantize_qwen(folder: Path, device: torch.device) -> nn.Module:
    """Qwen2.5-VL's language model, quantized to NF4 on `device` while it loads."""
    from hyvideo.v15_text import load_qwen_text_model

    return _load_text_model(load_qwen_text_model, "Qwen2.5-VL", folder, device, quantization_config=nf4_config())


def llm_cache_path(cache_dir: str | Path, name: str = LLM_CACHE_NAME) -> Path:
    """The NF4 encoder's folder inside the quantized-cache folder (`name`: LLM_CACHE_NAME or
    LLAVA_CACHE_NAME)."""
    return Path(cache_dir) / name


def _source_files(folder: Path) -> list[Path]:
    """What the NF4 weights are made from: the config and the weight files (not the tokenizer)."""
    weights = [p for p in folder.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json"))]
    return [folder / "config.json", *sorted(weights)]


def _llm_header(folder: Path) -> dict:
    """The part of the header that decides whether a cache is still valid."""
    import bitsandbytes
    import transformers

    config = nf4_config()
    return {
        "format": LLM_CACHE_FORMAT,
        "quantization": {"quant_type": config.bnb_4bit_quant_type, "double_quant": config.bnb_4bit_use_double_quant,
                         "compute_dtype": str(config.bnb_4bit_compute_dtype).removeprefix("torch.")},
        "sources": file_fingerprint(_source_files(folder), root=folder),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__},
    }


def llm_cache_status(llm_folder: str | Path, cache_dir: str | Path, verify: bool = False,
                     name: str = LLM_CACHE_NAME) -> CacheStatus:
    """Fresh, missing, stale (with the reason) or corrupt (unreadable header, a file missing or of
    the wrong size; with `verify`, also a wrong sha256, which reads every file) of the cache `name`
    in `cache_dir` made from `llm_folder`. Needs bitsandbytes."""
    folder, path = Path(llm_folder), llm_cache_path(cache_dir, name)
    header_path = path / LLM_CACHE_HEADER
    if not header_path.exists():
        return CacheStatus("missing", "no cache yet", path)
    try:
        found = json.loads(header_path.read_text())
        files = {file: (int(entry["size"]), entry["sha256"]) for file, entry in found["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return CacheStatus("corrupt", f"unreadable header {header_path}", path)
    for file, (size, _) in files.items():
        if not (path / file).is_file():
            return CacheStatus("corrupt", f"{file} is missing", path)
        if (path / file).stat().st_size != size:
            return CacheStatus("corrupt", f"{file} is {(path / file).stat().st_size} bytes, expected {size} (truncated?)", path)
    wanted = _llm_header(folder)
    for field, reason in (("format", "cache format changed"), ("quantization", "quantization settings changed"),
                          ("sources", "source changed")):
        if found.get(field) != wanted[field]:
            return CacheStatus("stale", reason, path)
    for library in ("transformers", "bitsandbytes"):
        if found.get("versions", {}).get(library) != wanted["versions"][library]:
            return CacheStatus("stale", f"{library} version changed", path)
    if verify:
        for file, (_, sha) in files.items():
            if file_sha256(path / file) != sha:
                return CacheStatus("corrupt", f"{file}: checksum mismatch", path)
    return CacheStatus("fresh", "", path)


def ensure_llm_nf4_cache(llm_folder: str | Path, cache_dir: str | Path, device: "torch.device | str",
                         on_status: Callable[[CacheStatus], None] | None = None,
                         quantize: Callable[[Path, torch.device], nn.Module] = quantize_llm,
                         name: str = LLM_CACHE_NAME) -> CacheStatus:
    """Build the NF4 encoder cache `name` in `cache_dir` from `llm_folder` (quantizing on `device`)
    unless a verified one is there; returns the status found before. A fresh cache is re-hashed
    (one read of ~4.7 GB, into the page cache the load that follows reads from). `on_status(status)`
    is called before a build. Raises NF4Unavailable when bitsandbytes cannot run (or save) this
    model in NF4 on `device`. `quantize(folder, device)`: how the source loads in NF4 (the Llama's
    AutoModel, `quantize_llava`, 1.5's Qwen); the model it gives is what the cache saves, and at
    most that is in memory (on `device`) while the cache is built."""
    device, folder = _device(device), _check_folder(llm_folder)
    reason = nf4_unavailable_reason(device)
    if reason is not None:
        raise NF4Unavailable(reason)
    status = llm_cache_status(folder, cache_dir, verify=True, name=name)
    if status.state != "fresh":
        if on_status is not None:
            on_status(status)
        _build_llm_cache(folder, llm_cache_path(cache_dir, name), device, quantize)
    return status


def _build_llm_cache(folder: Path, path: Path, device: torch.device, quantize: Callable[[Path, torch.device], nn.Module]) -> None:
    """Quantize, save into a temp folder, smoke-test, write the header, rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path)
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = quantize(folder, device)
        # Saved before any forward: bitsandbytes' CPU kernel repacks the weights on the first one,
        # and a model saved after that loads back with (slightly) different outputs.
        try:
            model.save_pretrained(tmp)
        except OSError:
            raise  # a full disk or the like: reported below as a HyVideoError
        except Exception as error:  # bitsandbytes / safetensors serialization errors have their own types
            raise NF4Unavailable(f"bitsandbytes could not save the NF4 model: {one_line(error)}") from error
        reason = _smoke_test(model, device)
        del model
        if reason is not None:
            raise NF4Unavailable(reason)
        files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        header = {**_llm_header(folder), "files": files}
        write_atomic(tmp / LLM_CACHE_HEADER, json.dumps(header, indent=1).encode(), "the NF4 encoder cache header")
        shutil.rmtree(path, ignore_errors=True)  # a stale or corrupt cache; until the rename the cache reads as missing
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as error:
        raise HyVideoError(f"could not save the NF4 encoder cache to {path}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smoke_test(model: nn.Module, device: torch.device) -> str | None:
    """Run two tokens through the loaded NF4 model, as the encoder will (eval, no grad).

    The backend probe cannot cover every layer shape: e.g. bitsandbytes' CPU kernel repacks
    weights on the first no-grad forward and requires out_features divisible by 32."""
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[0, 1]], device=device), output_hidden_states=True)
        if not all(torch.isfinite(h).all() for h in out.hidden_states):
            return f"the NF4 model gives non-finite outputs on {device}"
    except Exception as error:  # kernel failures surface as many exception types (runtime, assertion, unsupported op)
        return f"bitsandbytes cannot run this model in NF4 on {device}: {one_line(error)}"
    return None
