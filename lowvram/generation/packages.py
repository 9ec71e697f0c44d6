"""The optional packages a run needs, checked before any model loads.

A missing package must be one line at the start, not a crash after the text encoder, 50 DiT steps
and the VAE (the mp4 writer imports PyAV last). What each setting needs:
- a video of more than one frame: PyAV (`av`), the mp4 writer (lowvram/generation/video.py); one
  frame is a PNG, written without it;
- the NF4 text encoder on a GPU: bitsandbytes (quant/nf4.py). Where bitsandbytes is installed but
  its kernels fail, the encoder still falls back to bf16 with a warning; on the CPU NF4 always
  falls back, so nothing is needed there;
- the INT8 DiT: optimum-quanto (quant/int8.py).
`--gpus N` checks yunchang itself (lowvram.parallel.require_yunchang) and attention kernels are
probed (lowvram/attention_choice.py), so neither is repeated here.
"""

import importlib.util
from collections.abc import Callable

import torch

from hyvideo.errors import HyVideoError

# module -> (pip name, what needs it)
AV = ("av", "av", "the mp4 writer")
BITSANDBYTES = ("bitsandbytes", "bitsandbytes", "the NF4 text encoder of this profile")
QUANTO = ("optimum.quanto", "optimum-quanto", "the INT8 DiT of this profile")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package ("optimum"), or a half-imported module
        return False


def needed_packages(dit_scheme: str, encoder_scheme: str, frames: int, device: torch.device) -> list[tuple[str, str, str]]:
    """(module, pip name, what needs it) for every optional package these settings use."""
    needed = []
    if frames > 1:
        needed.append(AV)
    if encoder_scheme == "nf4" and torch.device(device).type == "cuda":
        needed.append(BITSANDBYTES)
    if dit_scheme == "int8":
        needed.append(QUANTO)
    return needed


def check_packages(dit_scheme: str, encoder_scheme: str, frames: int, device: torch.device,
                   is_installed: Callable[[str], bool] = installed) -> None:
    """Raise one HyVideoError naming every missing package and the pip command, before anything loads."""
    missing = [(pip, why) for module, pip, why in needed_packages(dit_scheme, encoder_scheme, frames, device)
               if not is_installed(module)]
    if missing:
        names = " ".join(pip for pip, _ in missing)
        reasons = "; ".join(f"{pip} ({why})" for pip, why in missing)
        raise HyVideoError(f"this run needs {reasons}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                           f"pip install {names}")
