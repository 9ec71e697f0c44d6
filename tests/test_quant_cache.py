"""Quantize-once cache: bit-identical reloads, stale rebuilds, corrupt caches refused."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hyvideo.weight_io import read_torch_file
from hyvideo.config import DIT_CONFIGS
from hyvideo.errors import HyVideoError
from quant.cache import (
    cache_paths, cache_status, ensure_dit_cache, load_cached_dit, quantize_dit_to_cache, quantized_tensors,
)
from quant.fp8 import swap_linears_fp8
from tests.test_quant_dit import dit_inputs, needs_quanto, run, tiny_dit

TINY = DIT_CONFIGS["tiny"]
SCHEMES = ["fp8", pytest.param("int8", marks=needs_quanto)]


@pytest.fixture
def source(tmp_path):
    """An official-layout DiT file (bf16, under "module") and its memory-mapped state dict."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": tiny_dit(seed=3).to(torch.bfloat16).state_dict()}, path)
    return path, read_torch_file(path)


def quantized_in_memory(state, scheme, policy="blocks"):
    model = tiny_dit().to(torch.bfloat16)
    model.load_state_dict(state)
    if scheme == "fp8":
        swap_linears_fp8(model, policy)
    else:
        from quant.int8 import quantize_int8

        quantize_int8(model, policy)
    return model.eval()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cache_loads_bit_identical(source, tmp_path, scheme):
    path, state = source
    out = tmp_path / "cache"
    weights = quantize_dit_to_cache([path], state, TINY, scheme, "blocks", out)
    assert weights == cache_paths(out, scheme)[0] and weights.name == f"dit-{scheme}.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [f"dit-{scheme}.json", f"dit-{scheme}.safetensors"]  # no temp files

    first = load_cached_dit(out, TINY, scheme, "blocks", source_files=[path])
    second = load_cached_dit(out, TINY, scheme, "blocks", source_files=[path])
    reference = quantized_in_memory(state, scheme)
    assert_same_state(first, reference)  # quantizing layer by layer == quantizing the model
    assert_same_state(second, first)
    inputs = dit_inputs()
    out_first = run(first, inputs)
    assert torch.equal(run(second, inputs), out_first) and torch.equal(run(reference, inputs), out_first)


def test_cache_file_is_plain_safetensors(source, tmp_path):
    path, state = source
    weights = quantize_dit_to_cache([path], state, TINY, "fp8", "blocks", tmp_path)
    expected = dict(quantized_tensors(state, TINY, "fp8", "blocks"))
    with safe_open(weights, "pt") as f:
        assert f.metadata() == {"format": "hyvideo-quant", "scheme": "fp8", "policy": "blocks"}
        assert sorted(k for k in f.keys() if not k.startswith("__padding__.")) == sorted(expected)
        for key in expected:
            assert torch.equal(f.get_tensor(key), expected[key]), key
    for key, tensor in load_file(weights).items():  # memory-mapped, every tensor 64-byte aligned
        assert tensor.data_ptr() % 64 == 0, key
    header = json.loads(cache_paths(tmp_path, "fp8")[1].read_text())
    assert header["scheme"] == "fp8" and header["policy"] == "blocks" and header["dtype"] == "bfloat16"
    assert header["file_size"] == weights.stat().st_size and len(header["file_sha256"]) == 64
    assert header["sources"][0]["size"] == path.stat().st_size and "torch" in header["versions"]


def test_stale_cache_is_rebuilt(source, tmp_path):
    path, state = source
    out = tmp_path / "cache"
    loads = []

    def load():
        loads.append(1)
        return state

    status = ensure_dit_cache([path], load, TINY, "fp8", "blocks", out)
    assert status.state == "missing" and len(loads) == 1
    assert ensure_dit_cache([path], load, TINY, "fp8", "blocks", out).state == "fresh" and len(loads) == 1

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the source was replaced
    status = cache_status(out, TINY, "fp8", "blocks", [path])
    assert (status.state, status.reason) == ("stale", "source changed")
    with pytest.raises(HyVideoError, match="stale"):
        load_cached_dit(out, TINY, "fp8", "blocks", source_files=[path])
    status = ensure_dit_cache([path], load, TINY, "fp8", "blocks", out)
    assert status.message == "rebuilding stale cache: source changed" and len(loads) == 2
    assert cache_status(out, TINY, "fp8", "blocks", [path]).state == "fresh"

    assert cache_status(out, TINY, "fp8", "blocks-no-mod", [path]).reason == "policy changed"
    assert cache_status(out, TINY, "fp8", "blocks", [path], dtype=torch.float16).reason == "dtype changed"
    assert cache_status(out, TINY, "int8", "blocks", [path]).state == "missing"  # one file per scheme


def test_truncated_cache_refused_then_rebuilt(source, tmp_path):
    path, state = source
    weights = quantize_dit_to_cache([path], state, TINY, "fp8", "blocks", tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    status = cache_status(tmp_path, TINY, "fp8", "blocks", [path])
    assert status.state == "corrupt" and "truncated" in status.reason
    with pytest.raises(HyVideoError, match="corrupt"):
        load_cached_dit(tmp_path, TINY, "fp8", "blocks", source_files=[path])
    status = ensure_dit_cache([path], lambda: state, TINY, "fp8", "blocks", tmp_path)
    assert status.message.startswith("rebuilding corrupt cache:")
    assert weights.read_bytes() == data


def test_corrupt_cache_refused(source, tmp_path):
    path, state = source
    weights = quantize_dit_to_cache([path], state, TINY, "fp8", "blocks", tmp_path)
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a tensor, same size
    weights.write_bytes(bytes(data))
    assert cache_status(tmp_path, TINY, "fp8", "blocks", [path]).state == "fresh"  # cheap check can't see it
    with pytest.raises(HyVideoError, match="checksum mismatch"):
        load_cached_dit(tmp_path, TINY, "fp8", "blocks", source_files=[path])

    cache_paths(tmp_path, "fp8")[1].write_text("{not json")
    assert cache_status(tmp_path, TINY, "fp8", "blocks").state == "corrupt"
    with pytest.raises(HyVideoError, match="corrupt"):
        load_cached_dit(tmp_path, TINY, "fp8", "blocks")


def test_cache_refuses_wrong_weights(source, tmp_path):
    path, state = source
    broken = dict(state)
    broken.pop("single_blocks.0.linear2.weight")
    with pytest.raises(HyVideoError, match="missing"):
        quantize_dit_to_cache([path], broken, TINY, "fp8", "blocks", tmp_path)
    with pytest.raises(HyVideoError, match="unknown DiT quantization scheme"):
        quantize_dit_to_cache([path], state, TINY, "nf4", "blocks", tmp_path)
    with pytest.raises(HyVideoError, match="cannot read weight file"):
        quantize_dit_to_cache([tmp_path / "gone.pt"], state, TINY, "fp8", "blocks", tmp_path)
    assert not list(tmp_path.glob("dit-*"))
