"""Quantize-once cache: bit-identical reloads from either layout, stale rebuilds, corrupt caches
refused, interrupted builds never used, and the memory a build needs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hyvideo.checkpoint import find_model_files, load_dit, load_dit_state_dict
from hyvideo.config import DIT_CONFIGS, DiTConfig
from hyvideo.diffusers_keys import diffusers_parts, official_to_diffusers
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.weight_io import read_safetensors, read_torch_file, write_safetensors_stream
from hyvideo.errors import HyVideoError
from quant.cache import (
    cache_paths, cache_status, ensure_dit_cache, file_sha256, load_cached_dit, quantize_dit_to_cache, quantized_tensors,
)
from quant.fp8 import swap_linears_fp8
from tests.helpers import dit_inputs, forward, needs_quanto, tiny_dit

TINY = DIT_CONFIGS["tiny"]
SCHEMES = ["fp8", pytest.param("int8", marks=needs_quanto)]
REPO = Path(__file__).resolve().parents[1]


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
    out_first = forward(first, inputs)
    assert torch.equal(forward(second, inputs), out_first) and torch.equal(forward(reference, inputs), out_first)


def test_cache_file_is_plain_safetensors(source, tmp_path):
    path, state = source
    weights = quantize_dit_to_cache([path], state, TINY, "fp8", "blocks", tmp_path)
    expected = dict(quantized_tensors(state, TINY, "fp8", "blocks"))
    with safe_open(weights, "pt") as f:
        assert f.metadata() == {"format": "hyvideo-quant", "scheme": "fp8", "policy": "blocks"}
        assert sorted(f.keys()) == sorted(expected)  # no filler tensors
        for key in expected:
            assert torch.equal(f.get_tensor(key), expected[key]), key
    for key, tensor in read_safetensors([weights]).items():  # views of the mapping, which starts on a page
        assert tensor.data_ptr() % 64 == 0, key  # fp8: every tensor is a multiple of 64 bytes
    header = json.loads(cache_paths(tmp_path, "fp8")[1].read_text())
    assert header["scheme"] == "fp8" and header["policy"] == "blocks" and header["dtype"] == "bfloat16"
    assert header["file_size"] == weights.stat().st_size and len(header["file_sha256"]) == 64
    assert header["sources"][0]["size"] == path.stat().st_size and "torch" in header["versions"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cache_written_with_filler_tensors_still_loads(source, tmp_path, scheme):
    """Caches written before the writer ordered tensors for alignment carry "__padding__.N" uint8
    tensors under the same header format; they load (fresh, same weights), not rebuilt or misread."""
    path, state = source
    out = tmp_path / "cache"
    weights, header_path = cache_paths(out, scheme)
    quantize_dit_to_cache([path], state, TINY, scheme, "blocks", out)
    expected = load_cached_dit(out, TINY, scheme, "blocks", source_files=[path])
    tensors = {k: v.clone() for k, v in read_safetensors([weights]).items()}
    old = {"__padding__.1": torch.zeros(40, dtype=torch.uint8), **tensors, "__padding__.2": torch.zeros(8, dtype=torch.uint8)}
    save_file(old, weights, {"format": "hyvideo-quant", "scheme": scheme, "policy": "blocks"})
    header = json.loads(header_path.read_text())
    header.update(file_size=weights.stat().st_size, file_sha256=file_sha256(weights))
    header_path.write_text(json.dumps(header))
    assert cache_status(out, TINY, scheme, "blocks", [path]).state == "fresh"
    assert_same_state(load_cached_dit(out, TINY, scheme, "blocks", source_files=[path]), expected)


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


@pytest.mark.parametrize("scheme", SCHEMES)
def test_both_layouts_give_the_same_cache(tiny_official, tiny_diffusers, tmp_path, scheme):
    """Same seed, same weights: the diffusers layout (q/k/v fused on access, one at a time) gives
    the byte-identical file as the official layout, and as the whole-model path (every fused
    tensor materialized by load_dit first)."""
    built = {}
    for name, root in (("official", tiny_official), ("diffusers", tiny_diffusers)):
        files = find_model_files(root)
        built[name] = quantize_dit_to_cache(files.dit_weights, load_dit_state_dict(files)[0], TINY, scheme, "blocks", tmp_path / name)
    files = find_model_files(tiny_diffusers)
    whole = load_dit(files, torch.float32).state_dict()  # the tiny checkpoints are float32
    built["whole"] = quantize_dit_to_cache(files.dit_weights, whole, TINY, scheme, "blocks", tmp_path / "whole")
    data = {name: path.read_bytes() for name, path in built.items()}
    assert data["diffusers"] == data["official"] == data["whole"]


def test_progress_per_block(source, tmp_path):
    path, state = source
    calls = []
    status = ensure_dit_cache([path], lambda: state, TINY, "fp8", "blocks", tmp_path, on_progress=lambda *c: calls.append(c))
    assert status.state == "missing"
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]  # 2 double + 2 single blocks, then the trunk and header
    ensure_dit_cache([path], lambda: state, TINY, "fp8", "blocks", tmp_path, on_progress=lambda *c: calls.append(c))
    assert len(calls) == 5  # fresh: nothing to do


def test_interrupted_rebuild_is_never_used(source, tmp_path):
    """An exception mid-write (Ctrl-C while blocks are being written) over a valid old cache: the
    old header is gone, so the cache reads as missing, no temp file stays, and a rebuild works."""
    path, state = source
    good = quantize_dit_to_cache([path], state, TINY, "fp8", "blocks", tmp_path).read_bytes()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # stale: the next ensure rebuilds

    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_dit_cache([path], lambda: state, TINY, "fp8", "blocks", tmp_path, on_progress=interrupt)
    assert cache_status(tmp_path, TINY, "fp8", "blocks", [path]).state == "missing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit-fp8.safetensors", "mp_rank_00_model_states.pt"]
    assert ensure_dit_cache([path], lambda: state, TINY, "fp8", "blocks", tmp_path).state == "missing"
    assert cache_status(tmp_path, TINY, "fp8", "blocks", [path]).state == "fresh"
    assert cache_paths(tmp_path, "fp8")[0].read_bytes() == good


KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    from hyvideo.checkpoint import read_torch_file
    from hyvideo.config import DIT_CONFIGS
    from quant.cache import quantize_dit_to_cache

    def die(done, total):
        if done == 2:  # two blocks are in the temp file
            os.kill(os.getpid(), signal.SIGKILL)

    source = sys.argv[1]
    quantize_dit_to_cache([source], read_torch_file(source), DIT_CONFIGS["tiny"], "fp8", "blocks", sys.argv[2], on_progress=die)
    """
)


@pytest.mark.slow
def test_killed_build_leaves_no_cache(source, tmp_path):
    """SIGKILL mid-write (no cleanup code runs): the half-written temp file is never taken for the
    cache, and the next build removes it."""
    path, state = source
    out = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(path), str(out)], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    assert len(list(out.glob(".dit-fp8.safetensors.tmp-*"))) == 1
    assert cache_status(out, TINY, "fp8", "blocks", [path]).state == "missing"
    with pytest.raises(HyVideoError, match="missing"):
        load_cached_dit(out, TINY, "fp8", "blocks", source_files=[path])
    assert ensure_dit_cache([path], lambda: state, TINY, "fp8", "blocks", out).state == "missing"
    assert sorted(p.name for p in out.iterdir()) == ["dit-fp8.json", "dit-fp8.safetensors"]
    reference = quantize_dit_to_cache([path], state, TINY, "fp8", "blocks", tmp_path / "reference")
    assert cache_paths(out, "fp8")[0].read_bytes() == reference.read_bytes()


ANON_PEAK = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    from hyvideo.checkpoint import ModelFiles, load_dit_state_dict
    from hyvideo.config import DIT_CONFIGS, DiTConfig
    from hyvideo.dit import HunyuanVideoDiT
    from quant.cache import quantize_dit_to_cache

    def rss_anon():  # this process's own memory; the mapped checkpoint's pages are RssFile
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    root = Path(sys.argv[1])
    # Warm-up on the tiny model: the first meta-tensor ops import torch's decompositions (~70 MB).
    tiny = DIT_CONFIGS["tiny"]
    quantize_dit_to_cache([], HunyuanVideoDiT(tiny).state_dict(), tiny, "fp8", "blocks", root / "warm-up")
    peak, done = [0], threading.Event()

    def sample():  # every millisecond while quantizing
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)

    before = rss_anon()
    sampler = threading.Thread(target=sample)
    sampler.start()
    files = ModelFiles("diffusers", root, [root / "model.safetensors"], root / "config.json", *[root] * 6)  # only the DiT is read
    config = DiTConfig.from_diffusers(json.loads(files.dit_config.read_text()))
    quantize_dit_to_cache(files.dit_weights, load_dit_state_dict(files)[0], config, "fp8", "blocks", root / "cache")
    done.set()
    sampler.join()
    print(json.dumps({"growth": peak[0] - before}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.slow
def test_quantize_memory_is_one_tensor_not_the_model(tmp_path):
    """Quantize a 620 MB diffusers-layout DiT (hidden 768, 4 double + 24 single blocks, bf16) in a
    fresh process and sample its anonymous memory (RssAnon: what it allocates itself; the
    memory-mapped checkpoint is file-backed and the kernel can drop it)."""
    config = DiTConfig(hidden_size=768, heads=6, double_blocks=4, single_blocks=24, refiner_blocks=1,
                       text_states_dim=64, text_states_dim_2=32)
    with torch.device("meta"):
        official = HunyuanVideoDiT(config).state_dict()
    layout = [(k, torch.bfloat16, tuple(t.shape)) for k, t in official_to_diffusers(official).items()]
    tensors = ((k, torch.empty(shape, dtype=dtype).uniform_(-0.05, 0.05)) for k, dtype, shape in layout)
    size, _ = write_safetensors_stream(tmp_path / "model.safetensors", layout, tensors)
    (tmp_path / "config.json").write_text(json.dumps(config.to_diffusers()))

    out = subprocess.run([sys.executable, "-c", ANON_PEAK, str(tmp_path)], capture_output=True, text=True, check=True, cwd=REPO)
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    fused = sum(t.numel() * 2 for k, t in official.items() if len(diffusers_parts(k)) > 1)
    largest = 7 * config.hidden_size**2  # elements of a single block's linear1 (q, k, v + MLP input rows)
    # One tensor at a time: the largest fused one in bf16 (2 bytes/element) plus quantize_fp8's
    # float32 temporaries (w.float(), w / scale, clamp: 12 bytes) = 14 bytes/element, 58 MB here.
    # Measured 59-115 MB: glibc keeps some freed chunks in its per-thread arenas. Allowed: twice
    # the formula + 48 MB. Fusing everything first (the old path) adds all fused tensors, 230 MB
    # here (measured 283 MB in all), so it cannot pass. For the 13B: linear1 has 66 M elements,
    # so about 1.9 GB at most, against 7.6 GB of fused tensors.
    bound = 2 * 14 * largest + 48 * 2**20
    print(f"anonymous memory growth while quantizing {size / 1e6:.0f} MB: {growth / 1e6:.0f} MB "
          f"(bound {bound / 1e6:.0f} MB; fused tensors {fused / 1e6:.0f} MB)")
    assert bound < fused
    assert growth < bound
