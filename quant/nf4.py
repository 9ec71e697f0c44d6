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
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from hyvideo.errors import HyVideoError


@dataclass
class LLMLoad:
    """What `load_llm_nf4` produced: the model, "nf4" or "bf16", and why NF4 was not used."""

    model: nn.Module
    scheme: str
    reason: str | None = None
    device: torch.device = torch.device("cpu")


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]


def nf4_unavailable_reason(device: "torch.device | str") -> str | None:
    """None if bitsandbytes can quantize to NF4 and multiply on `device`, else why not."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError as error:
        return f"bitsandbytes is not installed (pip install bitsandbytes): {_one_line(error)}"
    except Exception as error:  # a broken install raises anything at import time
        return f"bitsandbytes failed to load: {_one_line(error)}"
    try:
        weight = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        x = torch.randn(2, 64, device=device, dtype=torch.bfloat16)
        out = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        if out.shape != (2, 64) or not torch.isfinite(out).all():
            return f"bitsandbytes 4-bit matmul gives wrong results on {device}"
    except Exception as error:  # backend failures surface as many exception types (runtime, assertion, unsupported op)
        return f"bitsandbytes cannot run NF4 on {device}: {_one_line(error)}"
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


def load_llm_bf16(folder: str | Path, device: "torch.device | str" = "cpu") -> nn.Module:
    """The plain encoder (transformers AutoModel, i.e. the Llama without its LM head) in bf16."""
    from transformers import AutoModel

    path = _check_folder(folder)
    try:
        model = AutoModel.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HyVideoError(f"could not load the text encoder (LLM) from {path}: {_one_line(error)}") from error
    return model.to(device).eval()


def load_llm_nf4(folder: str | Path, device: "torch.device | str" = "cuda") -> LLMLoad:
    """The LLM encoder with NF4 linears on `device`, or (with the reason) the bf16 one on the CPU.

    Embeddings and norms stay bf16 (transformers quantizes only nn.Linear)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    path = _check_folder(folder)
    reason = nf4_unavailable_reason(device)
    if reason is None:
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(path, quantization_config=nf4_config(), dtype=torch.bfloat16,
                                              device_map={"": device}, local_files_only=True)
        except (OSError, KeyError) as error:
            raise HyVideoError(f"could not load the text encoder (LLM) from {path}: {_one_line(error)}") from error
        except Exception as error:  # transformers' bitsandbytes checks (versions, devices) raise various types
            reason = f"transformers could not load it in NF4: {_one_line(error)}"
        else:
            reason = _smoke_test(model.eval(), device)
            if reason is None:
                return LLMLoad(model, "nf4", None, device)
            del model
    return LLMLoad(load_llm_bf16(path, "cpu"), "bf16", reason, torch.device("cpu"))


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
        return f"bitsandbytes cannot run this model in NF4 on {device}: {_one_line(error)}"
    return None
