"""Quantize-once cache: the DiT's FP8 / INT8 state dict on disk, next to a JSON header.

Quantizing the 13B DiT from the 25.6 GB bf16 file takes minutes and the full bf16 model does not
fit in 24 GB of RAM, so it is done once, one tensor at a time, and written as
`<out_dir>/dit-<scheme>.safetensors` (our FP8 layout, or quanto's INT8 layout) plus
`<out_dir>/dit-<scheme>.json`:

  {"format": 1, "scheme", "policy", "dtype", "config", "sources": [fingerprint per file],
   "versions": {"torch", "hyvideo-quant", "optimum-quanto"}, "file_size", "file_sha256"}

- Fingerprint of a source file: size, mtime (ns) and sha256 of its first and last MiB. Cheap (2 MiB
  read per file) and catches a replaced or re-downloaded checkpoint; a changed fingerprint, scheme,
  policy, dtype, config or format makes the cache *stale*, and `ensure_dit_cache` rebuilds it.
- `file_sha256` is computed while writing. A load re-hashes the file (one streaming read, which
  also warms the page cache) and refuses a truncated or corrupt file with a HyVideoError; a damaged
  cache is never loaded.
- Writes are atomic: temp file in the same folder, fsync, rename; the old header is removed first,
  so an interrupted rebuild leaves a cache that reads as missing, never as valid.

The safetensors file is written by a small streaming writer (8-byte header length, JSON header,
raw little-endian tensor bytes, as the safetensors spec says): the layout is computed by running the
scheme's quantizer on meta tensors, then each real tensor is quantized, written, hashed and freed,
so peak memory is one layer. Tensors start 64-byte aligned ("__padding__.N" filler tensors, which
the loader drops). Loading uses safetensors' own reader, whose tensors point into the memory-mapped
file: nothing is copied until a block is moved to the GPU.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from hyvideo.checkpoint import check_state_dict
from hyvideo.config import DiTConfig
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError

from .fp8 import fp8_linear_state, swap_linears_fp8
from .int8 import int8_linear_state, quanto_version, requantize_int8
from .policy import QuantPolicy, get_policy

CACHE_FORMAT = 1
QUANT_VERSION = "1"  # bump when the quantizers' output changes
SCHEMES = ("fp8", "int8")
_MIB = 1 << 20
_ALIGN = 64
PADDING_PREFIX = "__padding__."
_SAFETENSORS_DTYPES = {
    torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
    torch.int8: "I8", torch.uint8: "U8",
}


@dataclass(frozen=True)
class CacheStatus:
    """What `cache_status` found: state is "fresh", "missing", "stale" or "corrupt"."""

    state: str
    reason: str
    path: Path

    @property
    def message(self) -> str:
        """One line for the CLI."""
        if self.state == "fresh":
            return f"using quantized cache {self.path}"
        if self.state == "missing":
            return f"building quantized cache {self.path} (once; later runs load it)"
        return f"rebuilding {self.state} cache: {self.reason}"


def cache_paths(out_dir: str | Path, scheme: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / f"dit-{scheme}.safetensors", out_dir / f"dit-{scheme}.json"


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise HyVideoError(f"unknown DiT quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")


def source_fingerprint(files: list[Path]) -> list[dict]:
    """Size, mtime and sha256 of the first and last MiB of each source file."""
    prints = []
    for path in map(Path, files):
        try:
            stat = path.stat()
            with open(path, "rb") as f:
                head = hashlib.sha256(f.read(_MIB)).hexdigest()
                f.seek(max(0, stat.st_size - _MIB))
                tail = hashlib.sha256(f.read(_MIB)).hexdigest()
        except OSError as error:
            raise HyVideoError(f"cannot read DiT source file {path}: {error.strerror or error}") from error
        prints.append({"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "head_sha256": head, "tail_sha256": tail})
    return prints


def _header(scheme: str, policy: QuantPolicy, dtype: torch.dtype, config: DiTConfig, sources: list[dict]) -> dict:
    """The part of the JSON header that decides whether a cache is still valid."""
    versions = {"torch": torch.__version__, "hyvideo-quant": QUANT_VERSION}
    if scheme == "int8":
        versions["optimum-quanto"] = quanto_version()
    header = {"format": CACHE_FORMAT, "scheme": scheme, "policy": policy.name, "dtype": str(dtype).removeprefix("torch."),
              "config": config.to_dict(), "sources": sources, "versions": versions}
    return json.loads(json.dumps(header))  # tuples -> lists, as they come back from the file


def quantized_tensors(state_dict: dict[str, torch.Tensor], config: DiTConfig, scheme: str,
                      policy: "str | QuantPolicy" = "blocks", dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    """The quantized state dict, one tensor at a time, in the model's key order.

    Policy linears go through the scheme's handler (fp8: weight + scale + bias; int8: quanto's
    keys); every other tensor is cast to `dtype`. Works on meta tensors (gives the layout)."""
    _check_scheme(scheme)
    quantized = set(get_policy(policy).module_names(config))
    handler = fp8_linear_state if scheme == "fp8" else int8_linear_state
    for key, tensor in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf == "bias":
            continue  # written with its weight
        if module in quantized and leaf == "weight":
            for name, value in handler(tensor, state_dict.get(module + ".bias"), dtype).items():
                yield f"{module}.{name}", value
        else:
            yield key, tensor.to(dtype)


def _tensor_bytes(tensor: torch.Tensor):
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename itself is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable) -> None:
    """write(file) into a temp file next to `path`, fsync, rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise HyVideoError(f"could not write the quantized cache {path}: {error.strerror or error}") from error
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _write_safetensors(path: Path, layout: list[tuple[str, torch.dtype, tuple]], tensors: Iterator, metadata: dict) -> tuple[int, str]:
    """Stream `tensors` (matching `layout`) into a safetensors file; returns (size, sha256).

    Every tensor starts 64-byte aligned in the file (and so in memory when the file is mapped):
    safetensors' reader returns tensors that point into the mapping, and some kernels need aligned
    data (torch's int8 CPU matmul, used by quanto, crashes on unaligned weights). The format allows
    no holes between tensors, so the gaps are filled by small "__padding__.N" uint8 tensors."""
    header, offset, pads = {"__metadata__": metadata}, 0, {}
    for key, dtype, shape in layout:
        if offset % _ALIGN:
            pad = _ALIGN - offset % _ALIGN
            pads[key] = pad
            header[f"{PADDING_PREFIX}{len(pads)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            offset += pad
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % _ALIGN)  # the data section starts aligned too
    digest, size = hashlib.sha256(), 0

    def write(f):
        nonlocal size
        for chunk in (len(blob).to_bytes(8, "little"), blob):
            f.write(chunk)
            digest.update(chunk)
        for (key, dtype, shape), (name, tensor) in zip(layout, tensors, strict=True):
            if name != key or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"quantizer gave {name} {tensor.dtype} {tuple(tensor.shape)}, layout says {key} {dtype} {shape}")
            for data in (bytes(pads.get(key, 0)), _tensor_bytes(tensor)):
                f.write(data)
                digest.update(data)
        size = f.tell()

    _write_atomic(path, write)
    return size, digest.hexdigest()


def quantize_dit_to_cache(state_dict_source_files: list[Path], state_dict: dict[str, torch.Tensor], config: DiTConfig,
                          scheme: str, policy: "str | QuantPolicy", out_dir: str | Path,
                          dtype: torch.dtype = torch.bfloat16) -> Path:
    """Quantize `state_dict` (the official DiT weights, e.g. memory-mapped from the files in
    `state_dict_source_files`) with `scheme`/`policy` and write the cache; returns the safetensors path."""
    _check_scheme(scheme)
    policy = get_policy(policy)
    with torch.device("meta"):
        meta_model = HunyuanVideoDiT(config)
    check_state_dict(meta_model, state_dict, "DiT weights")  # names and shapes, before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, header_path = cache_paths(out_dir, scheme)
    header = _header(scheme, policy, dtype, config, source_fingerprint(state_dict_source_files))

    meta_state = meta_model.state_dict()
    layout = [(k, t.dtype, tuple(t.shape)) for k, t in quantized_tensors(meta_state, config, scheme, policy, dtype)]
    ordered = {key: state_dict[key] for key in meta_state}
    header_path.unlink(missing_ok=True)  # from here until the new header exists, the cache reads as missing
    with torch.no_grad():
        size, sha = _write_safetensors(weights, layout, quantized_tensors(ordered, config, scheme, policy, dtype),
                                       {"format": "hyvideo-quant", "scheme": scheme, "policy": policy.name})
    header.update(file_size=size, file_sha256=sha)
    _write_atomic(header_path, lambda f: f.write(json.dumps(header, indent=1).encode()))
    return weights


def _read_header(header_path: Path) -> dict | None:
    try:
        return json.loads(header_path.read_text())
    except (OSError, ValueError):
        return None


def cache_status(out_dir: str | Path, config: DiTConfig, scheme: str, policy: "str | QuantPolicy" = "blocks",
                 source_files: list[Path] | None = None, dtype: torch.dtype = torch.bfloat16) -> CacheStatus:
    """Fresh, missing, stale (with the reason) or corrupt (unreadable header, wrong size).

    Cheap: reads the header, stats the file and fingerprints the sources (no full hash). Without
    `source_files` the source check is skipped."""
    _check_scheme(scheme)
    policy = get_policy(policy)
    weights, header_path = cache_paths(out_dir, scheme)
    if not header_path.exists() or not weights.exists():
        return CacheStatus("missing", "no cache yet", weights)
    found = _read_header(header_path)
    if not isinstance(found, dict) or "file_size" not in found:
        return CacheStatus("corrupt", f"unreadable header {header_path.name}", weights)
    size = weights.stat().st_size
    if size != found["file_size"]:
        return CacheStatus("corrupt", f"{weights.name} is {size} bytes, expected {found['file_size']} (truncated?)", weights)
    sources = source_fingerprint(source_files) if source_files is not None else found.get("sources")
    wanted = _header(scheme, policy, dtype, config, sources)
    for field, reason in (("format", "cache format changed"), ("scheme", "scheme changed"), ("policy", "policy changed"),
                          ("dtype", "dtype changed"), ("config", "model config changed"), ("sources", "source changed")):
        if found.get(field) != wanted[field]:
            return CacheStatus("stale", reason, weights)
    if found.get("versions", {}).get("hyvideo-quant") != QUANT_VERSION:
        return CacheStatus("stale", "quantizer version changed", weights)
    if scheme == "int8" and found["versions"].get("optimum-quanto") != wanted["versions"]["optimum-quanto"]:
        return CacheStatus("stale", "optimum-quanto version changed", weights)
    return CacheStatus("fresh", "", weights)


def ensure_dit_cache(source_files: list[Path], load_state_dict: Callable[[], dict], config: DiTConfig, scheme: str,
                     policy: "str | QuantPolicy", out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> CacheStatus:
    """Build the cache if it is missing, stale or corrupt; returns the status found *before*
    (its `.message` is what the CLI prints, e.g. "rebuilding stale cache: source changed").
    `load_state_dict` is only called when a build is needed."""
    status = cache_status(out_dir, config, scheme, policy, source_files, dtype)
    if status.state != "fresh":
        quantize_dit_to_cache(source_files, load_state_dict(), config, scheme, policy, out_dir, dtype)
    return status


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * _MIB):
            digest.update(chunk)
    return digest.hexdigest()


def load_cached_dit(cache_dir: str | Path, config: DiTConfig, scheme: str, policy: "str | QuantPolicy" = "blocks",
                    source_files: list[Path] | None = None, dtype: torch.dtype = torch.bfloat16,
                    device: "torch.device | str" = "cpu", verify: bool = True) -> HunyuanVideoDiT:
    """The quantized DiT from its cache; refuses (HyVideoError) a missing, stale, truncated or
    corrupt cache. `verify=False` skips the full-file hash (size and header are still checked)."""
    status = cache_status(cache_dir, config, scheme, policy, source_files, dtype)
    if status.state != "fresh":
        raise HyVideoError(f"cannot load the quantized DiT cache {status.path}: {status.state} ({status.reason}); "
                           "rebuild it from the DiT weights")
    header = _read_header(cache_paths(cache_dir, scheme)[1])
    if verify and file_sha256(status.path) != header["file_sha256"]:
        raise HyVideoError(f"the quantized DiT cache {status.path} is corrupt (checksum mismatch); delete it to rebuild")
    try:
        state = {k: v for k, v in load_file(status.path, device="cpu").items() if not k.startswith(PADDING_PREFIX)}
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise HyVideoError(f"the quantized DiT cache {status.path} is unreadable ({error}); delete it to rebuild") from error

    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    if scheme == "fp8":
        swap_linears_fp8(model, policy)
        model.load_state_dict(state, strict=True, assign=True)
        model.to(device)
    else:
        requantize_int8(model, state, policy, device)
    return model.eval()
