"""Weight files written one tensor at a time, so a 13B checkpoint never has to be in memory.

`write_safetensors_stream(path, layout, tensors)` writes a safetensors file (8-byte header length,
JSON header, raw little-endian tensor bytes, as the safetensors spec says) from an iterator of
tensors whose names, dtypes and shapes were announced up front in `layout`: each tensor is written,
hashed and can be freed before the next one is made, so peak memory is one tensor. The file is
written atomically (`files.write_atomic`) and its sha256 is returned with its size.

Every tensor starts 64-byte aligned in the file (and so in memory when the file is mapped): some
kernels need aligned data (torch's int8 CPU matmul, used by quanto, crashes on unaligned weights).
The format allows no holes between tensors, so the gaps are filled by small "__padding__.N" uint8
tensors, which readers drop (`PADDING_PREFIX`).
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from .files import write_atomic

ALIGN = 64
PADDING_PREFIX = "__padding__."
SAFETENSORS_DTYPES = {
    torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
    torch.int8: "I8", torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
}

Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]  # (name, dtype, shape) per tensor, in file order


def tensor_bytes(tensor: torch.Tensor):
    """The tensor's raw bytes (a numpy uint8 view, no copy when contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors_stream(path: Path, layout: Layout, tensors: Iterable[tuple[str, torch.Tensor]],
                             metadata: dict[str, str] | None = None, what: str = "a weight file") -> tuple[int, str]:
    """Write `tensors` ((name, tensor) pairs matching `layout`, in order) into a safetensors file;
    returns (file size, sha256 of the file)."""
    header, offset, pads = {"__metadata__": metadata or {}}, 0, {}
    for key, dtype, shape in layout:
        if offset % ALIGN:
            pad = ALIGN - offset % ALIGN
            pads[key] = pad
            header[f"{PADDING_PREFIX}{len(pads)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            offset += pad
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)  # the data section starts aligned too
    digest, size = hashlib.sha256(), 0

    def write(f):
        nonlocal size
        for chunk in (len(blob).to_bytes(8, "little"), blob):
            f.write(chunk)
            digest.update(chunk)
        for (key, dtype, shape), (name, tensor) in zip(layout, tensors, strict=True):
            if name != key or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"got {name} {tensor.dtype} {tuple(tensor.shape)} where the layout says {key} {dtype} {shape}")
            for data in (bytes(pads.get(key, 0)), tensor_bytes(tensor)):
                f.write(data)
                digest.update(data)
        size = f.tell()

    write_atomic(Path(path), write, what)
    return size, digest.hexdigest()
