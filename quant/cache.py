"""Quantize-once cache: the DiT's FP8 / INT8 state dict on disk, next to a JSON header.

Quantizing the 13B DiT from the 25.6 GB bf16 file takes minutes and the full bf16 model does not
fit in 24 GB of RAM, so it is done once, one tensor at a time, and written as
`<out_dir>/dit-<scheme>.safetensors` (our FP8 layout, or quanto's INT8 layout) plus
`<out_dir>/dit-<scheme>.json`:

  {"format": 1, "scheme", "policy", "dtype", "config", "sources": [fingerprint per file],
   "versions": {"torch", "hyvideo-quant", the scheme's packages (int8: "optimum-quanto")},
   "file_size", "file_sha256"}

What differs between the schemes (the quantized state of a linear, the runtime modules a cache
is loaded into, the package versions that invalidate it) is the scheme's handler in
`quant/schemes.py`; this file only asks it.

- Fingerprint of a source file (`hyvideo.files.file_fingerprint`): size, mtime (ns) and sha256 of
  its first and last MiB. Cheap (2 MiB read per file) and catches a replaced or re-downloaded checkpoint; a changed fingerprint, scheme,
  policy, dtype, config or format makes the cache *stale*, and `ensure_dit_cache` rebuilds it.
- `file_sha256` is computed while writing. A load re-hashes the file (one streaming read, which
  also warms the page cache) and refuses a truncated or corrupt file with a HyVideoError; a damaged
  cache is never loaded.
- Writes are atomic: temp file in the same folder, fsync, rename; the old header is removed first,
  so an interrupted rebuild leaves a cache that reads as missing, never as valid. The temp file a
  killed build leaves behind is removed by the next build.

The source tensors are fetched one at a time, in the model's key order, from the memory-mapped
state dict or from the lazy view that fuses diffusers' q/k/v on access; no dict of all tensors is
built. So the process's own memory grows by about one fused tensor and its quantizer temporaries
(13B: the largest is a single block's linear1, 66 M elements), whichever layout the weights are in.

The safetensors file is written by `hyvideo.weight_io.write_safetensors_stream`: the layout is
computed by running the scheme's quantizer on meta tensors, then each real tensor is quantized,
written, hashed and freed, so peak memory is one layer. Loading uses `hyvideo.weight_io.read_safetensors`,
whose tensors point into the read-only memory-mapped file: nothing is copied until a block is moved to the GPU.
"""

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hyvideo.checkpoint import check_state_dict
from hyvideo.config import DiTConfig
from hyvideo.models import dit_class
from hyvideo.errors import HyVideoError
from hyvideo.files import file_fingerprint, remove_dead_temps, write_atomic
from hyvideo.weight_io import read_safetensors, write_safetensors_stream

from .policy import QuantPolicy, get_policy
from .schemes import quant_scheme

CACHE_FORMAT = 1
QUANT_VERSION = "1"  # bump when the quantizers' output changes
_MIB = 1 << 20


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


def _header(scheme: str, policy: QuantPolicy, dtype: torch.dtype, config: DiTConfig, sources: list[dict]) -> dict:
    """The part of the JSON header that decides whether a cache is still valid."""
    versions = {"torch": torch.__version__, "hyvideo-quant": QUANT_VERSION, **quant_scheme(scheme).versions()}
    header = {"format": CACHE_FORMAT, "scheme": scheme, "policy": policy.name, "dtype": str(dtype).removeprefix("torch."),
              "config": config.to_dict(), "sources": sources, "versions": versions}
    return json.loads(json.dumps(header))  # tuples -> lists, as they come back from the file


def quantized_tensors(state_dict: Mapping[str, torch.Tensor], config: DiTConfig, scheme: str,
                      policy: "str | QuantPolicy" = "blocks", dtype: torch.dtype = torch.bfloat16,
                      keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The quantized state dict, one tensor at a time, in the order of `keys` (default: the state
    dict's own; the cache passes the model's).

    Policy linears go through the scheme's handler (`quant.schemes`; fp8: weight + scale + bias;
    int8: quanto's keys); every other tensor is cast to `dtype`. Each source tensor is looked up
    when it is needed and not kept. Works on meta tensors (gives the layout)."""
    handler = quant_scheme(scheme)
    quantized = set(get_policy(policy).module_names(config))
    for key in state_dict if keys is None else keys:
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf == "bias":
            continue  # written with its weight
        if module in quantized and leaf == "weight":
            for name, value in handler.linear_state(state_dict[key], state_dict.get(module + ".bias"), dtype).items():
                yield f"{module}.{name}", value
        else:
            yield key, state_dict[key].to(dtype)


def _block_of(key: str) -> str | None:
    """The block a key is in ("double_blocks.3" for "double_blocks.3.img_mod.linear.weight"), else None."""
    kind, index, *_ = key.split(".")
    return f"{kind}.{index}" if kind in ("double_blocks", "single_blocks") else None


def _report_blocks(tensors: Iterator[tuple[str, torch.Tensor]], total: int,
                   on_progress: Callable[[int, int], None]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `tensors` through; when the writer asks for the first tensor after a block, that block
    is written: call on_progress(blocks done, total)."""
    done, block = 0, None
    for key, tensor in tensors:
        current = _block_of(key)
        if block is not None and current != block:
            done += 1
            on_progress(done, total)
        block = current
        yield key, tensor


def quantize_dit_to_cache(state_dict_source_files: list[Path], state_dict: Mapping[str, torch.Tensor], config: DiTConfig,
                          scheme: str, policy: "str | QuantPolicy", out_dir: str | Path,
                          dtype: torch.dtype = torch.bfloat16,
                          on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Quantize `state_dict` (the official DiT weights: memory-mapped from the files in
    `state_dict_source_files`, or the lazy diffusers view) with `scheme`/`policy` and write the
    cache; returns the safetensors path.

    `on_progress(done, total)`: total = double + single blocks + 1. It is called as each block has
    been written, then with (total, total) once the cache is complete: the last step stands for the
    trunk (embedders, token refiner, final layer) and the header."""
    quant_scheme(scheme)  # an unknown scheme is refused before any work
    policy = get_policy(policy)
    with torch.device("meta"):
        meta_model = dit_class(config)(config)
    check_state_dict(meta_model, state_dict, "DiT weights")  # names and shapes, before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, header_path = cache_paths(out_dir, scheme)
    header = _header(scheme, policy, dtype, config, file_fingerprint(state_dict_source_files))

    meta_state = meta_model.state_dict()
    layout = [(k, t.dtype, tuple(t.shape)) for k, t in quantized_tensors(meta_state, config, scheme, policy, dtype)]
    tensors = quantized_tensors(state_dict, config, scheme, policy, dtype, keys=meta_state)
    total = config.double_blocks + config.single_blocks + 1
    if on_progress is not None:
        tensors = _report_blocks(tensors, total, on_progress)
    header_path.unlink(missing_ok=True)  # from here until the new header exists, the cache reads as missing
    remove_dead_temps(weights)
    with torch.no_grad():
        size, sha = write_safetensors_stream(weights, layout, tensors,
                                             {"format": "hyvideo-quant", "scheme": scheme, "policy": policy.name},
                                             "the quantized cache")
    header.update(file_size=size, file_sha256=sha)
    write_atomic(header_path, json.dumps(header, indent=1).encode(), "the quantized cache header")
    if on_progress is not None:
        on_progress(total, total)
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
    handler = quant_scheme(scheme)
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
    sources = file_fingerprint(source_files) if source_files is not None else found.get("sources")
    wanted = _header(scheme, policy, dtype, config, sources)
    for field, reason in (("format", "cache format changed"), ("scheme", "scheme changed"), ("policy", "policy changed"),
                          ("dtype", "dtype changed"), ("config", "model config changed"), ("sources", "source changed")):
        if found.get(field) != wanted[field]:
            return CacheStatus("stale", reason, weights)
    if found.get("versions", {}).get("hyvideo-quant") != QUANT_VERSION:
        return CacheStatus("stale", "quantizer version changed", weights)
    for package in handler.versions():  # torch's version is recorded, not compared
        if found["versions"].get(package) != wanted["versions"][package]:
            return CacheStatus("stale", f"{package} version changed", weights)
    return CacheStatus("fresh", "", weights)


def ensure_dit_cache(source_files: list[Path], load_state_dict: Callable[[], Mapping[str, torch.Tensor]], config: DiTConfig,
                     scheme: str, policy: "str | QuantPolicy", out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                     on_progress: Callable[[int, int], None] | None = None) -> CacheStatus:
    """Build the cache if it is missing, stale or corrupt; returns the status found *before*
    (its `.message` is what the CLI prints, e.g. "rebuilding stale cache: source changed").
    `load_state_dict` is only called when a build is needed; `on_progress` as in
    `quantize_dit_to_cache` (not called when the cache is fresh)."""
    status = cache_status(out_dir, config, scheme, policy, source_files, dtype)
    if status.state != "fresh":
        quantize_dit_to_cache(source_files, load_state_dict(), config, scheme, policy, out_dir, dtype, on_progress)
    return status


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * _MIB):
            digest.update(chunk)
    return digest.hexdigest()


def load_cached_dit(cache_dir: str | Path, config: DiTConfig, scheme: str, policy: "str | QuantPolicy" = "blocks",
                    source_files: list[Path] | None = None, dtype: torch.dtype = torch.bfloat16,
                    device: "torch.device | str" = "cpu", verify: bool = True) -> torch.nn.Module:
    """The quantized DiT from its cache; refuses (HyVideoError) a missing, stale, truncated or
    corrupt cache. `verify=False` skips the full-file hash (size and header are still checked)."""
    status = cache_status(cache_dir, config, scheme, policy, source_files, dtype)
    if status.state != "fresh":
        raise HyVideoError(f"cannot load the quantized DiT cache {status.path}: {status.state} ({status.reason}); "
                           "rebuild it from the DiT weights")
    header = _read_header(cache_paths(cache_dir, scheme)[1])
    if verify and file_sha256(status.path) != header["file_sha256"]:
        raise HyVideoError(f"the quantized DiT cache {status.path} is corrupt (checksum mismatch); delete it to rebuild")
    state = read_safetensors([status.path])  # its own one-line errors (memory, truncated, not safetensors)

    with torch.device("meta"):
        model = dit_class(config)(config)
    return quant_scheme(scheme).load(model, state, policy, device).eval()
