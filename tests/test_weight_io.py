"""Weight files: the read-only readers against torch.load / safetensors, the streaming writers, and
how a problem is told apart (memory, incomplete file, not a checkpoint at all)."""

import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyvideo.errors import HyVideoError
from safetensors import safe_open

from hyvideo.weight_io import (
    check_weight_file, read_safetensors, read_torch_file, safetensors_file_order, write_safetensors_stream, write_torch_stream,
)

INCOMPLETE = "incomplete or corrupt .*download it again"


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def assert_same(a, b):
    """Bit for bit: same structure, dtype, shape, strides, offset into the storage, storage bytes."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
        return
    assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset())
    assert torch.equal(storage_bytes(a), storage_bytes(b))


def varied_state():
    """Every case the readers must get right: dtypes (bf16, fp8, int64, bool), 0-d and empty tensors,
    views sharing one storage (a transpose, an offset slice), nested dicts."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "fp8": torch.randn(7, generator=g).to(torch.float8_e4m3fn),
        "fp16": torch.randn(2, 2, 2, generator=g).half(),
        "int64": torch.arange(-3, 9),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5),
        "nested": {"base": base, "slice": base[1:, 2:], "transposed": base.t(), "deeper": {"u8": torch.arange(5, dtype=torch.uint8)}},
    }


def test_torch_reader_equals_torch_load(tmp_path):
    path = tmp_path / "varied.pt"
    torch.save(varied_state(), path)
    ours = read_torch_file(path)
    assert_same(ours, torch.load(path, weights_only=True))
    nested = ours["nested"]
    assert nested["slice"].untyped_storage().data_ptr() == nested["base"].untyped_storage().data_ptr()  # still shared


@pytest.mark.parametrize("wrapper", ["module", "ema", "state_dict", "model"])
def test_wrappers_are_unwrapped(tmp_path, wrapper):
    torch.save({wrapper: {"w": torch.ones(2)}, "step": 3}, tmp_path / "wrapped.pt")
    assert list(read_torch_file(tmp_path / "wrapped.pt")) == ["w"]


def test_zip64_records(tmp_path):
    """Files over 4 GB carry zip64 extra fields in their local headers; rewrite a small file that
    way (Python's zipfile, forced) so the data offsets must skip them."""
    source, repacked = tmp_path / "small.pt", tmp_path / "zip64.pt"
    torch.save(varied_state(), source)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(repacked, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            with new.open(info.filename, "w", force_zip64=True) as f:
                f.write(old.read(info.filename))
    with zipfile.ZipFile(repacked) as archive:  # each local header carries a zip64 extra field (20 bytes)
        assert all(read_offset(repacked, i) - i.header_offset - 30 - len(i.filename) >= 20 for i in archive.infolist())
    assert_same(read_torch_file(repacked), torch.load(source, weights_only=True))


def test_safetensors_reader_equals_load_file(tmp_path):
    flat = {k: v for k, v in varied_state().items() if k != "nested"}
    flat = {k: v.contiguous() for k, v in flat.items()}
    save_file(flat, tmp_path / "theirs.safetensors")
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in flat.items()]
    write_safetensors_stream(tmp_path / "ours.safetensors", layout, iter(flat.items()))
    for name in ("theirs", "ours"):
        got = read_safetensors([tmp_path / f"{name}.safetensors"])
        assert_same(got, load_file(tmp_path / f"{name}.safetensors"))
        assert_same(got, flat)


def test_safetensors_writer_aligns_by_order_without_filler_tensors(tmp_path):
    """The file holds exactly the given tensors (what transformers/diffusers expect of a weight
    file), its data starts 64-byte aligned, every tensor of a multiple of 64 bytes starts 64-byte
    aligned and every other one at a multiple of its element size; safetensors' own reader (which
    refuses holes and overlaps) gives the same tensors."""
    g = torch.Generator().manual_seed(0)
    tensors = {  # produced in this order: odd sizes between aligned ones
        "odd_bf16": torch.randn(3, generator=g).to(torch.bfloat16),  # 6 bytes
        "w1": torch.randn(4, 16, generator=g),  # 256 bytes
        "scalar_f32": torch.tensor(1.5),  # 4 bytes
        "w2": torch.randn(64, generator=g).to(torch.bfloat16),  # 128 bytes
        "odd_i64": torch.arange(5),  # 40 bytes
        "odd_u8": torch.arange(7, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "w3": torch.randn(2, 64, generator=g).to(torch.float8_e4m3fn),  # 128 bytes
    }
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = tmp_path / "aligned.safetensors"
    write_safetensors_stream(path, layout, iter(tensors.items()), {"format": "pt"})
    assert [name for name, _, _ in safetensors_file_order(layout)] == [
        "w1", "w2", "empty", "w3", "odd_i64", "scalar_f32", "odd_bf16", "odd_u8"]  # falling element size at the end
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
    assert_same(load_file(path), tensors)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert (8 + header_len) % 64 == 0
    read = read_safetensors([path])
    for name, tensor in tensors.items():
        alignment = 64 if tensor.nbytes % 64 == 0 else tensor.itemsize
        assert read[name].data_ptr() % alignment == 0, name  # the mapping starts on a page: address = file offset


def test_files_with_the_old_filler_tensors_still_read(tmp_path):
    """Files written before the ordering rule (quantized caches, demo models) carry "__padding__.N"
    uint8 tensors; the reader drops them."""
    weights = {"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    save_file({**weights, "__padding__.1": torch.zeros(52, dtype=torch.uint8)}, tmp_path / "old.safetensors")
    assert_same(read_safetensors([tmp_path / "old.safetensors"]), weights)


def test_shards_are_merged(tmp_path):
    save_file({"a": torch.ones(3)}, tmp_path / "1.safetensors")
    save_file({"b": torch.zeros(2, dtype=torch.int8)}, tmp_path / "2.safetensors")
    assert sorted(read_safetensors([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])) == ["a", "b"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mapping_is_shared_and_read_only(tmp_path):
    """The point of these readers: torch.load(mmap=True) maps the file private and writable (the
    kernel may refuse that for a file larger than RAM + swap); ours maps it read-only and shared."""
    torch.save({"w": torch.ones(1 << 16)}, tmp_path / "a.pt")
    save_file({"w": torch.ones(1 << 16)}, tmp_path / "b.safetensors")
    tensors = [read_torch_file(tmp_path / "a.pt"), read_safetensors([tmp_path / "b.safetensors"]),
               torch.load(tmp_path / "a.pt", mmap=True, weights_only=True)]
    maps = pathlib.Path("/proc/self/maps").read_text().splitlines()

    def modes(name):
        return {line.split()[1] for line in maps if line.endswith(str(tmp_path / name))}

    assert modes("b.safetensors") == {"r--s"}
    assert modes("a.pt") == {"r--s", "rw-p"}  # ours, and torch.load's for comparison
    assert len(tensors) == 3  # (the mappings live as long as the tensors)


def test_torch_stream_writer_loads_with_torch_load(tmp_path):
    state = {k: v.contiguous() for k, v in varied_state().items() if k != "nested"}
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    path = tmp_path / "stream.pt"
    size = write_torch_stream(path, layout, iter(state.items()), under="module")
    assert size == path.stat().st_size
    assert_same(torch.load(path, weights_only=True)["module"], state)  # plain torch.load, no help from us
    assert_same(read_torch_file(path), state)
    with zipfile.ZipFile(path) as archive:  # records 64-byte aligned and in layout order, as torch.save writes them
        data = [i for i in archive.infolist() if "/data/" in i.filename]
        assert [i.filename.rsplit("/", 1)[1] for i in data] == [str(i) for i in range(len(state))]
        assert all(read_offset(path, i) % 64 == 0 for i in data)


def read_offset(path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def test_writers_refuse_tensors_that_do_not_match_the_layout(tmp_path):
    layout = [("a", torch.float32, (2,))]
    for write in (write_torch_stream, write_safetensors_stream):
        with pytest.raises(RuntimeError, match="layout says a"):
            write(tmp_path / "x", layout, iter([("a", torch.zeros(3))]))
        assert not (tmp_path / "x").exists()


# --- problems, told apart --------------------------------------------------------------------------


@pytest.fixture
def torch_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"module": {"w": torch.zeros(1000), "b": torch.zeros(10)}}, path)
    return path


@pytest.fixture
def safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, path)
    return path


def assert_refused(path, message):
    """The reader and the doctor's check say the same."""
    read = (lambda: read_safetensors([path])) if path.suffix == ".safetensors" else (lambda: read_torch_file(path))
    for call in (read, lambda: check_weight_file(path)):
        with pytest.raises(HyVideoError, match=message) as error:
            call()
        assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_truncated_torch_file(torch_file):
    torch_file.write_bytes(torch_file.read_bytes()[:3000])  # starts like a zip, the directory at the end is gone
    assert_refused(torch_file, INCOMPLETE)


def test_record_past_the_end(torch_file):
    """An intact directory that says a record is longer than the file."""
    data = bytearray(torch_file.read_bytes())
    pos = data.find(b"PK\x01\x02")
    while pos != -1:  # central directory entries: sizes at +20 / +24, name length at +28, name at +46
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46:pos + 46 + name_len].endswith(b"data/0"):
            struct.pack_into("<II", data, pos + 20, len(data), len(data))
        pos = data.find(b"PK\x01\x02", pos + 4)
    torch_file.write_bytes(bytes(data))
    assert_refused(torch_file, INCOMPLETE + "|past the end")


def test_empty_file(torch_file):
    torch_file.write_bytes(b"")
    assert_refused(torch_file, INCOMPLETE)


def test_foreign_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n" * 10)
    assert_refused(text, "is not a PyTorch checkpoint")
    plain_zip = tmp_path / "archive.pt"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert_refused(plain_zip, "is not a PyTorch checkpoint")
    not_json = tmp_path / "garbage.safetensors"
    not_json.write_bytes((20).to_bytes(8, "little") + b"{this is not json!!}" + bytes(100))
    assert_refused(not_json, "is not a safetensors checkpoint")
    huge_header = tmp_path / "text.safetensors"
    huge_header.write_text("these are not weights\n" * 10)
    assert_refused(huge_header, "is not a safetensors checkpoint")


def test_truncated_safetensors(safetensors_file):
    data = safetensors_file.read_bytes()
    safetensors_file.write_bytes(data[:-100])  # tensor data cut
    assert_refused(safetensors_file, INCOMPLETE)
    safetensors_file.write_bytes(data[:20])  # header cut
    assert_refused(safetensors_file, INCOMPLETE)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"w": torch.zeros(2), "where": pathlib.PurePosixPath("/tmp")}, path)
    with pytest.raises(HyVideoError, match="objects other than tensors.*weights_only"):
        read_torch_file(path)


ADDRESS_SPACE_SCRIPT = textwrap.dedent(
    """
    import os, resource, sys
    from hyvideo.errors import HyVideoError
    from hyvideo.weight_io import check_weight_file, read_safetensors, read_torch_file

    def vm_size():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmSize:")).split()[1]) * 1024

    paths = sys.argv[1:]
    # leave less address space than the smallest file needs: mapping it must fail, nothing else
    room = min(os.path.getsize(p) for p in paths) // 2
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + room, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for path in paths:
        for call in (read_safetensors, check_weight_file) if path.endswith(".safetensors") else (read_torch_file, check_weight_file):
            try:
                call([path] if call is read_safetensors else path)
                print("read")
            except HyVideoError as error:
                print(error)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
@pytest.mark.slow
def test_refused_mapping_is_a_memory_problem(tmp_path):
    """A real ENOMEM from mmap (address space limited below the file size in a subprocess): the
    message must blame memory, not the file (the old message said "download it again")."""
    pt, st = tmp_path / "big.pt", tmp_path / "big.safetensors"
    torch.save({"w": torch.zeros(12 << 20)}, pt)  # 48 MiB
    save_file({"w": torch.zeros(12 << 20)}, st)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", ADDRESS_SPACE_SCRIPT, str(pt), str(st)],
                         capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert len(out) == 4, out
    for line in out:
        assert "short of memory or address space" in line and "not a problem with the file" in line, line
        assert "download" not in line
