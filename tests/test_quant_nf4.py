"""The NF4 LLM encoder on the tiny Llama folder, its quantize-once cache, and the bf16 fallback
when bitsandbytes can't run."""

import json
import os
import shutil
import sys

import pytest
import torch

from hyvideo.errors import HyVideoError
from lowvram.setup.synthetic_checkpoint import write_text_encoder
from quant import nf4
from quant.nf4 import (
    LLM_CACHE_HEADER, ensure_llm_nf4_cache, llm_cache_path, llm_cache_status, load_llm_bf16, load_llm_nf4,
    nf4_unavailable_reason,
)
from tests.helpers import rel_err


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    """Widths divisible by 32 (hidden 64, k/v 32, MLP 128), as in Llama-3-8B: bitsandbytes' CPU
    kernel needs that."""
    return write_text_encoder(tmp_path_factory.mktemp("llm"), "llm", hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def odd_llm_folder(tmp_path_factory):
    """The default tiny encoder (hidden 48, k/v 24): not every kernel accepts 24 outputs."""
    return write_text_encoder(tmp_path_factory.mktemp("llm48"), "llm")


def encode(model, device="cpu"):
    """hidden_states[-3], as the text encoder uses it (facts §4.1), for a fixed token sequence."""
    ids = torch.arange(1, 41).reshape(1, 40) * 7 % 500
    with torch.no_grad():
        return model(input_ids=ids.to(device), output_hidden_states=True).hidden_states[-3].float().cpu()


def test_nf4_on_cpu(llm_folder):
    reason = nf4_unavailable_reason("cpu")
    loaded = load_llm_nf4(llm_folder, "cpu")
    if reason is not None:  # bitsandbytes without a CPU backend: the fallback is the contract
        assert loaded.scheme == "bf16" and loaded.reason == reason
        return
    import bitsandbytes as bnb

    assert loaded.scheme == "nf4" and loaded.reason is None
    linears = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16  # embeddings stay bf16
    # NF4 = 16 levels per 64-weight block, ~8-10 % RMS error per weight; after two decoder layers of
    # this random model (residual stream included) we measure 10.4 %. 20 % leaves room for other
    # kernels and still catches a broken dequantization (that gives ~100 %).
    assert rel_err(encode(loaded.model), encode(load_llm_bf16(llm_folder))) < 0.20


def test_unsupported_shapes_fall_back(odd_llm_folder):
    """Whatever the backend does with 24-wide layers, the result is a working encoder: NF4 if the
    kernels accept it, else bf16 with the kernel's complaint as the reason (never a traceback)."""
    loaded = load_llm_nf4(odd_llm_folder, "cpu")
    if loaded.scheme == "bf16":
        assert loaded.reason == nf4_unavailable_reason("cpu") or "cannot run this model in NF4" in loaded.reason
        assert torch.equal(encode(loaded.model), encode(load_llm_bf16(odd_llm_folder)))
    else:
        assert torch.isfinite(encode(loaded.model)).all()


def test_fallback_without_bitsandbytes(llm_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    reason = nf4_unavailable_reason("cpu")
    assert "pip install bitsandbytes" in reason
    loaded = load_llm_nf4(llm_folder, "cpu")
    assert (loaded.scheme, loaded.reason, loaded.device) == ("bf16", reason, torch.device("cpu"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert torch.equal(encode(loaded.model), encode(load_llm_bf16(llm_folder)))


def test_fallback_without_cuda(llm_folder):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    loaded = load_llm_nf4(llm_folder, "cuda")
    assert loaded.scheme == "bf16" and loaded.reason == "CUDA is not available" and loaded.device.type == "cpu"


def test_broken_folder(tmp_path):
    with pytest.raises(HyVideoError, match="config.json"):
        load_llm_nf4(tmp_path, "cpu")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(HyVideoError, match="could not load"):
        load_llm_bf16(tmp_path)


@pytest.mark.cuda
def test_nf4_on_cuda(llm_folder):
    reason = nf4_unavailable_reason("cuda")
    if reason is not None and "not installed" in reason:
        pytest.skip(reason)
    loaded = load_llm_nf4(llm_folder, "cuda")
    assert loaded.scheme == "nf4", loaded.reason
    assert loaded.device.type == "cuda"
    assert rel_err(encode(loaded.model, "cuda"), encode(load_llm_bf16(llm_folder))) < 0.20  # as on the CPU


# --- the quantize-once cache ------------------------------------------------------------------


@pytest.fixture
def source(llm_folder, tmp_path):
    """A copy of the tiny LLM that a test may change."""
    return shutil.copytree(llm_folder, tmp_path / "llm")


def require_cpu_nf4():
    """These tests need NF4 on the CPU (bitsandbytes >= 0.48 has a CPU backend); say why not."""
    reason = nf4_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"bitsandbytes cannot run NF4 on the CPU here, so there is nothing to cache: {reason}")


class Spy:
    """Counts bitsandbytes' 4-bit quantizations and records the folders transformers loads from."""

    def __init__(self, monkeypatch):
        import bitsandbytes.functional as bnbf
        from transformers import AutoModel

        self.quantized, self.loaded = [], []
        quantize, load = bnbf.quantize_4bit, AutoModel.from_pretrained

        def quantize_4bit(weight, *args, **kwargs):
            self.quantized.append(tuple(weight.shape))
            return quantize(weight, *args, **kwargs)

        def from_pretrained(folder, *args, **kwargs):
            self.loaded.append(str(folder))
            return load(folder, *args, **kwargs)

        monkeypatch.setattr(bnbf, "quantize_4bit", quantize_4bit)
        monkeypatch.setattr(AutoModel, "from_pretrained", from_pretrained)


@pytest.mark.slow
def test_cache_round_trip_and_second_load_does_not_quantize(source, tmp_path, monkeypatch):
    require_cpu_nf4()
    cache = tmp_path / "cache"
    spy, statuses = Spy(monkeypatch), []
    first = load_llm_nf4(source, "cpu", cache, on_status=statuses.append)
    assert first.scheme == "nf4", first.reason  # e.g. bitsandbytes could not save the NF4 model: ...
    assert [s.state for s in statuses] == ["missing"] and len(spy.quantized) == 1 + 28  # backend probe + 28 linears
    assert sorted(p.name for p in llm_cache_path(cache).iterdir()) == ["config.json", LLM_CACHE_HEADER, "model.safetensors"]
    assert not [p for p in cache.iterdir() if p.name != "llm-nf4"]  # no temp folder left

    spy.quantized.clear(), spy.loaded.clear()
    second = load_llm_nf4(source, "cpu", cache, on_status=statuses.append)
    assert second.scheme == "nf4" and len(statuses) == 1  # fresh: no build
    assert spy.quantized == [(64, 64)]  # only the backend probe's 64x64 test weight
    assert spy.loaded == [str(llm_cache_path(cache))]  # the bf16 source is not loaded
    uncached = load_llm_nf4(source, "cpu")
    assert torch.equal(encode(first.model), encode(uncached.model))  # saving and loading change no bit
    assert torch.equal(encode(second.model), encode(uncached.model))
    header = json.loads((llm_cache_path(cache) / LLM_CACHE_HEADER).read_text())
    assert header["quantization"] == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    assert {f["file"] for f in header["sources"]} == {"config.json", "model.safetensors"}
    assert header["files"]["model.safetensors"]["size"] == (llm_cache_path(cache) / "model.safetensors").stat().st_size
    assert set(header["versions"]) == {"torch", "transformers", "bitsandbytes"}


@pytest.mark.slow
def test_stale_and_corrupt_caches_are_rebuilt(source, tmp_path):
    require_cpu_nf4()
    cache = tmp_path / "cache"
    statuses = []
    reference = encode(load_llm_nf4(source, "cpu", cache).model)
    weights = llm_cache_path(cache) / "model.safetensors"
    header = llm_cache_path(cache) / LLM_CACHE_HEADER
    good = weights.read_bytes()

    def damaged(expected_state, reason):
        status = llm_cache_status(source, cache, verify=True)
        assert (status.state, reason in status.reason) == (expected_state, True), status
        loaded = load_llm_nf4(source, "cpu", cache, on_status=statuses.append)
        assert loaded.scheme == "nf4" and statuses[-1] == status
        assert status.message.startswith(f"rebuilding {expected_state} cache:")
        assert llm_cache_status(source, cache, verify=True).state == "fresh"
        assert weights.read_bytes() == good and torch.equal(encode(loaded.model), reference)

    weights.write_bytes(good[: len(good) // 2])
    damaged("corrupt", "truncated")
    flipped = bytearray(good)
    flipped[-100] ^= 0x01  # same size: only the full hash sees it
    weights.write_bytes(bytes(flipped))
    assert llm_cache_status(source, cache).state == "fresh"
    damaged("corrupt", "checksum mismatch")
    header.write_text("{not json")
    damaged("corrupt", "unreadable header")
    values = json.loads(header.read_text())
    values["versions"]["bitsandbytes"] = "0.0.1"
    header.write_text(json.dumps(values))
    damaged("stale", "bitsandbytes version changed")
    stat = (source / "model.safetensors").stat()
    os.utime(source / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced source
    damaged("stale", "source changed")


def test_interrupted_build_leaves_no_cache(source, tmp_path, monkeypatch):
    """Stopped after the weights were saved but before the header: no cache, no temp folder."""
    require_cpu_nf4()
    cache = tmp_path / "cache"

    def interrupt(model, device):
        raise KeyboardInterrupt

    monkeypatch.setattr(nf4, "_smoke_test", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ensure_llm_nf4_cache(source, cache, "cpu")
    assert list(cache.iterdir()) == [] and llm_cache_status(source, cache).state == "missing"
    monkeypatch.undo()
    assert ensure_llm_nf4_cache(source, cache, "cpu").state == "missing"
    assert llm_cache_status(source, cache, verify=True).state == "fresh"


def test_cache_falls_back_like_the_plain_load(source, odd_llm_folder, tmp_path, monkeypatch):
    """No usable NF4 -> bf16 on the CPU with the reason, and nothing cached."""
    cache = tmp_path / "cache"
    odd = load_llm_nf4(odd_llm_folder, "cpu", cache)  # 24-wide layers: see test_unsupported_shapes_fall_back
    assert (odd.scheme == "bf16") == (not llm_cache_path(cache).exists())
    if torch.cuda.is_available():
        return
    loaded = load_llm_nf4(source, "cuda", tmp_path / "cuda-cache")
    assert (loaded.scheme, loaded.reason) == ("bf16", "CUDA is not available")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    loaded = load_llm_nf4(source, "cpu", tmp_path / "no-bnb")
    assert loaded.scheme == "bf16" and "pip install bitsandbytes" in loaded.reason
    assert not (tmp_path / "cuda-cache").exists() and not (tmp_path / "no-bnb").exists()
