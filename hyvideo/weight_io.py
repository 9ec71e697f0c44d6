"""Weight files, written one tensor at a time and read through read-only memory maps, so a 13B
checkpoint is never in memory as a whole, and never charged to memory as a private copy.

Writers. `write_safetensors_stream` (safetensors: 8-byte header length, JSON header, raw
little-endian tensor bytes) and `write_torch_stream` (the `torch.save` zip format) take an iterator
of tensors whose names, dtypes and shapes were announced up front in `layout`: each tensor is
written and can be freed before the next one is made, so peak memory is one tensor. Files are
written atomically (`files.write_atomic`). `torch.save` aligns its records to 64 bytes itself.

Alignment of safetensors files. The readers below return views of the mapped file, so a tensor's
address is its offset in the file, and some kernels need aligned data: torch's int8 CPU matmul
(used by quanto) crashed on unaligned weights from the quantized cache, and CPU matmul results can
depend on alignment. The format allows no holes between tensors (offsets are contiguous from 0),
and other tools (transformers, diffusers) take every entry for a weight, so there are no filler
tensors either; the alignment comes from the header and the order instead:
- the JSON header is padded with spaces (which the format allows) so the data starts at a
  multiple of 64 bytes;
- the tensors whose size is a multiple of 64 bytes come first, in the order given, so each starts
  64-byte aligned; the others (scalars, odd-sized vectors: at full size only quanto's two scalar
  scales per INT8 layer and the VAE's 3-channel output bias) follow at the end, largest element
  first, so each is still aligned to its element size (as safetensors' own writer guarantees).
The writer keeps those few end tensors in memory until everything else is written.
Files written before this rule carry "__padding__.N" uint8 filler tensors; the reader drops them
(`OLD_PADDING_PREFIX`), so a quantized cache from then still loads.

Readers. `torch.load(mmap=True)` and safetensors' `load_file` map the whole file private and
writable (MAP_PRIVATE, `rw-p` in /proc/self/maps). The kernel counts such a mapping as memory it
may have to provide, so with overcommit heuristics (vm.overcommit_memory=0) and no swap a 24 GiB
machine refuses to map the 25.6 GB DiT ("Cannot allocate memory"). `read_torch_file` and
`read_safetensors` map the file read-only and shared instead (no commit charge; the pages are page
cache the kernel can drop and read again), parse the zip directory or safetensors header
themselves, and return tensors that are views of the mapping: bit-identical to `torch.load` /
`load_file`. Unpickling goes through torch's weights-only unpickler, so a `.pt` file is as safe to
read as with `torch.load(weights_only=True)`.

The tensors are read-only. Writing into one in place would crash the process (SIGSEGV), so torch's
"non-writable buffer" warning is silenced knowingly: the loaders never write into weights in place
(dtype casts, fusing q/k/v, quantization and device moves all make new tensors).

Measured here (2 cores, 24 GiB RAM, no swap): a 1.66 GB file of 33 bf16 tensors, read in a fresh
process and every tensor touched (`t.sum()`); RSS from /proc/self/status, commit from /proc/meminfo:
  reader                  RssAnon   RssFile (before -> after)   Committed_AS   mapping
  torch.load(mmap=True)   143 MiB   127 -> 1724 MiB             +1584 MiB      rw-p (private, writable)
  safetensors load_file   143 MiB   127 -> 1724 MiB             +1584 MiB      rw-p
  read_torch_file         144 MiB   127 -> 1724 MiB                +2 MiB      r--s (shared, read-only)
  read_safetensors        144 MiB   127 -> 1724 MiB                +2 MiB      r--s
Resident memory is the same page cache either way; the difference is the commit charge, which is
what decides whether a file larger than RAM + swap can be mapped at all.

Problems are told apart, each as a one-line `HyVideoError`: the system refused the mapping for lack
of memory or address space (ENOMEM: a memory problem, not the file's), the file is incomplete (a zip
whose end-of-directory is missing, a record or tensor past the end of the file), or the file is not
a PyTorch / safetensors checkpoint at all, or a pickle that asks for a function (os.system, ...),
refused before anything is called. `read_weight_index` (`index=True` of both readers) runs the same
checks and returns meta tensors (names, dtypes, shapes) without reading any tensor data, for
`lowvram doctor` (what the file holds, `weight_contents.py`).
"""

import errno
import hashlib
import io
import json
import math
import mmap
import pickle
import re
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import _weights_only_unpickler

from .errors import HyVideoError
from .files import write_atomic

ALIGN = 64
OLD_PADDING_PREFIX = "__padding__."  # filler tensors of files written before the rule above
SAFETENSORS_DTYPES = {
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.float32: "F32", torch.float64: "F64", torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}
SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own limit; a larger "length" means another format
ZIP_MAGIC = b"PK\x03\x04"
ZIP_LOCAL_HEADER = 30  # bytes before a record's name and extra field

Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]  # (name, dtype, shape) per tensor, in file order


# --- writing ---------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor):
    """The tensor's raw bytes (a numpy uint8 view, no copy when contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _checked(layout: Layout, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors`, each checked against its layout entry (a writer bug must not give a wrong file)."""
    for (key, dtype, shape), (name, tensor) in zip(layout, tensors, strict=True):
        if name != key or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"got {name} {tensor.dtype} {tuple(tensor.shape)} where the layout says {key} {dtype} {shape}")
        yield key, tensor


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def safetensors_file_order(layout: Layout) -> Layout:
    """The order tensors are stored in (see "Alignment" in the module docstring): those whose size
    is a multiple of ALIGN as given, then the others by falling element size (a stable sort)."""
    aligned = [entry for entry in layout if _nbytes(entry[1], entry[2]) % ALIGN == 0]
    rest = [entry for entry in layout if _nbytes(entry[1], entry[2]) % ALIGN]
    return aligned + sorted(rest, key=lambda entry: -entry[1].itemsize)


def write_safetensors_stream(path: Path, layout: Layout, tensors: Iterable[tuple[str, torch.Tensor]],
                             metadata: dict[str, str] | None = None, what: str = "a weight file") -> tuple[int, str]:
    """Write `tensors` ((name, tensor) pairs matching `layout`, in order) into a safetensors file
    holding exactly those tensors, in `safetensors_file_order`; returns (file size, sha256 of the file)."""
    header, offset = {"__metadata__": metadata or {}}, 0
    order = safetensors_file_order(layout)
    for key, dtype, shape in order:
        nbytes = _nbytes(dtype, shape)
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)  # the data section starts aligned
    at_end = {key for key, dtype, shape in order if _nbytes(dtype, shape) % ALIGN}
    digest, size = hashlib.sha256(), 0

    def write(f):
        nonlocal size

        def put(data):
            f.write(data)
            digest.update(data)

        put(len(blob).to_bytes(8, "little"))
        put(blob)
        held = {}  # the end tensors' bytes (copied: a view would keep its whole base alive)
        for key, tensor in _checked(layout, tensors):
            if key in at_end:
                held[key] = tensor_bytes(tensor).copy()
            else:
                put(tensor_bytes(tensor))
        for key, _, _ in order[len(order) - len(at_end):]:
            put(held.pop(key))
        size = f.tell()

    write_atomic(Path(path), write, what)
    return size, digest.hexdigest()


class _StorageId:
    """Stands for one record in the pickle; `_TorchPickler.persistent_id` turns it into the id."""

    def __init__(self, pid: tuple):
        self.pid = pid


class _TorchPickler(pickle.Pickler):
    """Pickles (meta) tensors as `torch.save` pickles contiguous CPU tensors that own their storage:
    `_rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())` (v3 with an untyped storage
    and the dtype for float8 and the other newer dtypes), the storage being the persistent id
    ("storage", storage type, key, "cpu", numel). Keys are "0", "1", ... in the order met."""

    def __init__(self, file):
        super().__init__(file, protocol=2)  # torch.save's protocol
        self.records = 0

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _StorageId) else None

    def reducer_override(self, obj):
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        key, shape = str(self.records), tuple(obj.shape)
        self.records += 1
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        if obj.dtype in torch.storage._new_dtypes():
            storage = _StorageId(("storage", torch.UntypedStorage, key, "cpu", obj.numel() * obj.dtype.itemsize))
            return torch._utils._rebuild_tensor_v3, (storage, 0, shape, stride, False, OrderedDict(), obj.dtype)
        storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
        storage = _StorageId(("storage", storage_type, key, "cpu", obj.numel()))
        return torch._utils._rebuild_tensor_v2, (storage, 0, shape, stride, False, OrderedDict())


def write_torch_stream(path: Path, layout: Layout, tensors: Iterable[tuple[str, torch.Tensor]],
                       under: str | None = None, what: str = "a weight file") -> int:
    """Write `tensors` ((name, tensor) pairs matching `layout`, in order) as a file `torch.load`
    reads: the dict {name: tensor}, or {under: that dict} (the official DiT's "module"). Returns
    the file size. The pickle only needs the layout, so it is written first and the tensors follow
    as records "data/0", "data/1", ... in layout order, as `torch.save` lays them out."""
    state = {key: torch.empty(shape, dtype=dtype, device="meta") for key, dtype, shape in layout}
    pickled = io.BytesIO()
    _TorchPickler(pickled).dump({under: state} if under else state)
    size = 0

    def write(f):
        nonlocal size
        writer = torch._C.PyTorchFileWriter(f, True, ALIGN)  # CRC-32 on, records 64-byte aligned (as torch.save)
        try:
            for name, data in (("data.pkl", pickled.getvalue()), (".format_version", "1"),
                               (".storage_alignment", str(ALIGN)), ("byteorder", sys.byteorder)):
                writer.write_record(name, data, len(data))
            for i, (_, tensor) in enumerate(_checked(layout, tensors)):
                data = tensor.detach().contiguous()
                start = data.storage_offset() * data.itemsize  # a view's bytes within its storage (no copy)
                writer.write_record(f"data/{i}", data.untyped_storage()[start:start + data.nbytes], data.nbytes)
        finally:  # also on errors: the writer's destructor would finish the file itself and abort the process
            writer.write_end_of_file()
        size = f.tell()

    write_atomic(Path(path), write, what)
    return size


# --- reading ---------------------------------------------------------------------------------------


def _incomplete(path: Path, detail: str) -> HyVideoError:
    return HyVideoError(f"cannot read {path}: the file is incomplete or corrupt ({detail}); download it again")


def _foreign(path: Path, kind: str, detail: str) -> HyVideoError:
    return HyVideoError(f"{path} is not a {kind} checkpoint ({detail}); replace it with the downloaded file")


def _map(path: Path) -> mmap.mmap:
    """`path` mapped read-only and shared (see the module docstring for why not private)."""
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # mmap refuses empty files
        raise _incomplete(path, "the file is empty") from None
    except OSError as error:
        if error.errno == errno.ENOMEM:
            raise HyVideoError(
                f"cannot map {path} ({path.stat().st_size / 1e9:.1f} GB) into memory: the system is short of memory "
                "or address space (this is not a problem with the file); close other programs, add RAM or swap, "
                "or raise the address-space limit (`ulimit -v`)") from None
        raise HyVideoError(f"cannot read {path}: {error.strerror or error}") from None


def _mapped_bytes(mapped: mmap.mmap, offset: int, nbytes: int) -> torch.Tensor:
    """mapped[offset : offset + nbytes] as a uint8 tensor that shares the mapping (read-only)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset)


def _torch_records(path: Path, mapped: mmap.mmap) -> tuple[dict[str, tuple[int, int]], bytes]:
    """The records of a `torch.save` zip as {name below the archive folder: (data offset, size)},
    and the pickle (data.pkl). Reads the zip directory, local headers and data.pkl only."""
    if mapped[:4] != ZIP_MAGIC:
        raise _foreign(path, "PyTorch", "not in the torch.save zip format")
    size = len(mapped)
    try:
        with zipfile.ZipFile(path) as archive:  # zip64 directories included
            infos = archive.infolist()
            pickles = [i.filename for i in infos if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
            if not pickles:
                raise _foreign(path, "PyTorch", "a zip without data.pkl")
            pickled = archive.read(pickles[0])  # checks its CRC-32
    except (zipfile.BadZipFile, EOFError) as error:
        no_directory = str(error) == "File is not a zip file"  # what zipfile says when the end record is missing
        raise _incomplete(path, "the zip directory at its end is missing" if no_directory else f"zip: {error}") from None
    prefix = pickles[0].removesuffix("data.pkl")
    records = {}
    for info in infos:
        start = info.header_offset
        if start + ZIP_LOCAL_HEADER > size or mapped[start:start + 4] != ZIP_MAGIC:
            raise _incomplete(path, f"no zip header where {info.filename} should start")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _foreign(path, "PyTorch", f"{info.filename} is compressed")
        name_len, extra_len = struct.unpack_from("<HH", mapped, start + 26)
        offset = start + ZIP_LOCAL_HEADER + name_len + extra_len
        if offset + info.file_size > size:
            raise _incomplete(path, f"{info.filename} ends past the end of the file")
        records[info.filename.removeprefix(prefix)] = (offset, info.file_size)
    start, length = records.get("byteorder", (0, 0))
    if (mapped[start:start + length] or b"little") != sys.byteorder.encode():  # no record: little, as torch.load assumes
        raise HyVideoError(f"{path} was saved with the other byte order; load and re-save it with torch.save on this machine")
    return records, pickled


def read_torch_file(path: Path, index: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a `torch.save` file, as read-only views of a read-only mapping; unwraps
    "module" / "ema" / "state_dict" / "model" wrappers as the official and diffusers loaders do.
    `index=True`: the same dict of meta tensors (names, dtypes, shapes), no tensor data read.

    data.pkl goes through torch's weights-only unpickler, which builds tensors and plain containers
    and calls nothing else: a pickle that asks for any other function or class (os.system, ...)
    is refused before that is called."""
    path = Path(path)
    mapped = _map(path)
    records, pickled = _torch_records(path, mapped)
    storages = {}

    def persistent_load(pid):
        _, storage_type, key, _, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in storages:
            offset, size = records.get(f"data/{key}", (0, None))
            if size != numel * dtype.itemsize:
                raise _incomplete(path, f"record data/{key} is missing or of the wrong size")
            if index:
                storage = torch.UntypedStorage(size, device="meta")
            else:
                storage = _mapped_bytes(mapped, offset, size).untyped_storage()
            storages[key] = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        return storages[key]

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        data = unpickler.load()
    except pickle.UnpicklingError as error:
        called = re.search(r"GLOBAL (\S+)", str(error))
        if called:  # "posix.system" is how os.system pickles on Linux
            name = re.sub(r"^(posix|nt)\.", "os.", called.group(1))
            raise HyVideoError(f"{path} is not a weights file: its pickle calls {name} (refused, nothing executed); "
                               "it holds objects other than tensors, which torch.load(weights_only=True) refuses too") from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HyVideoError(f"{path} holds objects other than tensors, refused as torch.load(weights_only=True) "
                           f"refuses them ({reason}); use a weights-only checkpoint") from None
    except HyVideoError:
        raise
    except Exception as error:  # a damaged pickle fails in many ways
        raise _incomplete(path, f"data.pkl: {type(error).__name__}") from None
    finally:
        if index:
            mapped.close()
    for key in ("module", "ema", "state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            return data[key]
    if not isinstance(data, dict):
        raise HyVideoError(f"{path} does not hold a state dict")
    return data


def _safetensors_entries(path: Path, mapped: mmap.mmap) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """{name: (dtype, shape, data offset in the file, size)} from a safetensors header, checked
    against the file's size. Reads the header only."""
    size = len(mapped)
    if size < 8:
        raise _incomplete(path, "shorter than the 8-byte header length")
    header_len = int.from_bytes(mapped[:8], "little")
    if header_len > SAFETENSORS_HEADER_LIMIT:
        raise _foreign(path, "safetensors", f"its first 8 bytes say the header is {header_len} bytes long")
    if 8 + header_len > size:
        raise _incomplete(path, f"the header is cut off at {size} of {8 + header_len} bytes")
    names = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
    entries = {}
    try:
        for name, info in json.loads(mapped[8:8 + header_len]).items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = names[info["dtype"]], [int(n) for n in info["shape"]], info["data_offsets"]
            if not 0 <= start <= end or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{name}: data offsets {start}..{end} do not fit its shape {shape}")
            entries[name] = (dtype, shape, 8 + header_len + start, end - start)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        raise _foreign(path, "safetensors", f"its header does not parse: {type(error).__name__}: {error}") from None
    end = max((offset + nbytes for _, _, offset, nbytes in entries.values()), default=0)
    if end > size:
        raise _incomplete(path, f"{size} of {end} bytes")
    return entries


def read_safetensors(paths: Iterable[Path], index: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files `paths` (shards of one model), as read-only views of
    read-only mappings; the filler tensors of files written before (`OLD_PADDING_PREFIX`) are dropped.
    `index=True`: the same dict of meta tensors, from the headers alone."""
    state_dict = {}
    for path in map(Path, paths):
        mapped = _map(path)
        for name, (dtype, shape, offset, nbytes) in _safetensors_entries(path, mapped).items():
            if name.startswith(OLD_PADDING_PREFIX):
                continue
            if index:
                state_dict[name] = torch.empty(shape, dtype=dtype, device="meta")
            else:
                state_dict[name] = _mapped_bytes(mapped, offset, nbytes).view(dtype).reshape(shape)
        if index:
            mapped.close()
    return state_dict


def read_weight_index(paths: Iterable[Path]) -> dict[str, torch.Tensor]:
    """The index of weight files (one model's shards, safetensors or torch files): every tensor's
    name, dtype and shape as a meta tensor, from the safetensors header or the zip directory and
    data.pkl (through the weights-only unpickler). Raises the HyVideoError the reader would raise
    before it touches tensor data, so a 25 GB file is checked in milliseconds."""
    index = {}
    for path in map(Path, paths):
        index |= read_safetensors([path], index=True) if path.suffix == ".safetensors" else read_torch_file(path, index=True)
    return index


def check_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The file's index (`read_weight_index`), or the HyVideoError the reader would raise: mapped
    as the readers map it, every record or tensor inside the file, the pickle weights-only."""
    return read_weight_index([path])
