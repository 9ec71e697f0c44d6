"""Image-to-video's LLaVA in NF4 (quant/nf4.py `load_llava_nf4`): only the language model's linears
4-bit, and its quantize-once cache (`llava-nf4/`, beside the Llama's `llm-nf4/` in one cache folder),
wired into a run's text stage and `lowvram quantize --only encoder`."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hyvideo.checkpoint import find_model_files
from hyvideo.errors import HyVideoError
from hyvideo.text_encoder import LlavaTextEncoder, load_llava_model
from lowvram.planner import plan
from lowvram.profiles import Profile
from lowvram.progress import Reporter
from lowvram.setup.quantize import quantize_model
from lowvram.setup.synthetic_checkpoint import SIZES, llava_image_processor, write_synthetic_checkpoint, write_text_encoder
from lowvram.stages import Stages, model_sizes
from quant.nf4 import (
    LLAVA_CACHE_NAME, LLM_CACHE_HEADER, llm_cache_path, llm_cache_status, load_llava_nf4, load_llm_nf4,
    nf4_unavailable_reason,
)
from tests.helpers import rel_err
from tests.tiny_llava import write_tiny_llava

# Widths bitsandbytes' CPU kernel takes (hidden 64, k/v 32, MLP 128; see tests/test_quant_nf4.py).
WIDE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
TEXT_LEN = 40


def write_wide_llava(folder):
    """The tiny-i2v LLaVA (tests/tiny_llava.py's kind, 2-layer CLIP tower of 28 px) with a 64-wide
    Llama, and its image processor: a `text_encoder_i2v/` folder."""
    write_text_encoder(folder, "llava", "tiny-i2v", **WIDE)
    llava_image_processor(SIZES["tiny-i2v"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    return write_wide_llava(tmp_path_factory.mktemp("llava") / "text_encoder_i2v")


@pytest.fixture(scope="module")
def image():
    y, x = np.mgrid[0:40, 0:56]
    return Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8))


def encode(model, folder, image):
    """What the I2V text stage makes of a prompt and the image with `model` (states [1, 1 + 36, 64])."""
    encoder = LlavaTextEncoder.from_folder(folder, "token_replace", text_len=TEXT_LEN, model=model)
    return encoder.encode("A cat walks on the grass.", image)[0].float()


def require_cpu_nf4():
    reason = nf4_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"bitsandbytes cannot run NF4 on the CPU here, so there is nothing to cache: {reason}")


def record_loads(monkeypatch) -> tuple[list, list]:
    """(the shapes bitsandbytes quantizes, the folders a LlavaModel is loaded from), from now on."""
    import bitsandbytes.functional as bnbf
    from transformers import LlavaModel

    quantized, loaded_from = [], []
    quantize_4bit, from_pretrained = bnbf.quantize_4bit, LlavaModel.from_pretrained

    def counting_quantize(weight, *args, **kwargs):
        quantized.append(tuple(weight.shape))
        return quantize_4bit(weight, *args, **kwargs)

    def recording_load(folder, *args, **kwargs):
        loaded_from.append(str(folder))
        return from_pretrained(folder, *args, **kwargs)

    monkeypatch.setattr(bnbf, "quantize_4bit", counting_quantize)
    monkeypatch.setattr(LlavaModel, "from_pretrained", recording_load)
    return quantized, loaded_from


def four_bit(module) -> list[str]:
    import bitsandbytes as bnb

    return [name for name, m in module.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_only_the_language_model_is_nf4(llava_folder, image):
    """4-bit: the language model's 28 linears; the vision tower and projector stay bf16 (with
    LlavaForConditionalGeneration's module names, transformers quantized them too), no LM head."""
    from transformers import LlavaModel

    reason = nf4_unavailable_reason("cpu")
    loaded = load_llava_nf4(llava_folder, "cpu")
    reference = load_llava_model(llava_folder, torch.bfloat16)
    assert type(loaded.model) is LlavaModel
    if reason is not None:  # bitsandbytes without a CPU backend: the fallback is the contract
        assert loaded.scheme == "bf16" and loaded.reason == reason
        assert torch.equal(encode(loaded.model, llava_folder, image), encode(reference, llava_folder, image))
        return
    assert loaded.scheme == "nf4" and loaded.reason is None
    assert len(four_bit(loaded.model)) == 4 * 7 and all(n.startswith("language_model.") for n in four_bit(loaded.model))
    for part in (loaded.model.vision_tower, loaded.model.multi_modal_projector):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    # NF4's error, as for the Llama (tests/test_quant_nf4.py: 10 % there): measured 5.4 % here over
    # the kept image and prompt states (hidden_states[-3]); 20 % as there: a broken dequantization
    # gives ~100 %.
    assert rel_err(encode(loaded.model, llava_folder, image), encode(reference, llava_folder, image)) < 0.20


@pytest.mark.slow  # 7 s (measured on 2 idle-ish cores, 20 s busy): NF4 loads and builds, two rebuilds
def test_cache_built_once_equals_quantizing_on_load(llava_folder, image, tmp_path, monkeypatch):
    """Built once beside a Llama cache in the same folder (each keeps its own), then loaded as it is:
    nothing quantized again and the source not read; the encoder's outputs equal the model quantized
    on load bit for bit. A changed source or a truncated file is rebuilt."""
    require_cpu_nf4()
    source, cache = shutil.copytree(llava_folder, tmp_path / "llava"), tmp_path / "cache"
    llm = write_text_encoder(tmp_path / "llm", "llm", **WIDE)
    assert load_llm_nf4(llm, "cpu", cache).scheme == "nf4"
    statuses = []
    built = load_llava_nf4(source, "cpu", cache, on_status=statuses.append)
    assert built.scheme == "nf4", built.reason
    assert [s.state for s in statuses] == ["missing"]
    path = llm_cache_path(cache, LLAVA_CACHE_NAME)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", LLM_CACHE_HEADER, "model.safetensors"]
    assert sorted(p.name for p in cache.iterdir()) == ["llava-nf4", "llm-nf4"]  # no temp folder left
    assert llm_cache_status(llm, cache, verify=True).state == "fresh"  # the Llama's cache is untouched

    quantized, loaded_from = record_loads(monkeypatch)
    cached = load_llava_nf4(source, "cpu", cache, on_status=statuses.append)
    assert cached.scheme == "nf4" and len(statuses) == 1  # fresh: no build
    assert quantized == [(64, 64)] and loaded_from == [str(path)]  # the backend probe only; the cache only
    assert four_bit(cached.model) == four_bit(built.model)
    monkeypatch.undo()

    expected = encode(load_llava_nf4(source, "cpu").model, source, image)
    assert torch.equal(encode(built.model, source, image), expected)
    assert torch.equal(encode(cached.model, source, image), expected)

    stat = (source / "model.safetensors").stat()
    os.utime(source / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced source
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    for damage, state, reason in ((lambda: None, "stale", "source changed"),
                                  (lambda: weights.write_bytes(good[: len(good) // 2]), "corrupt", "truncated")):
        damage()
        status = llm_cache_status(source, cache, name=LLAVA_CACHE_NAME)
        assert (status.state, reason in status.reason) == (state, True), status
        rebuilt = load_llava_nf4(source, "cpu", cache, on_status=statuses.append)
        assert statuses[-1] == status and rebuilt.scheme == "nf4"
        assert torch.equal(encode(rebuilt.model, source, image), expected)
    assert llm_cache_status(source, cache, verify=True, name=LLAVA_CACHE_NAME).state == "fresh"


def test_no_nf4_caches_nothing(tmp_path, image):
    """The default tiny LLaVA (24-wide k/v layers): where the kernel refuses them, the bf16 LlavaModel
    on the CPU with the reason, equal to the plain load, and no cache written."""
    folder = write_tiny_llava(tmp_path / "llava")
    loaded = load_llava_nf4(folder, "cpu", tmp_path / "cache")
    assert (loaded.scheme == "bf16") == (not llm_cache_path(tmp_path / "cache", LLAVA_CACHE_NAME).exists())
    if loaded.scheme == "bf16":
        plain = load_llava_model(folder, torch.bfloat16)
        assert torch.equal(encode(loaded.model, folder, image), encode(plain, folder, image))
    if not torch.cuda.is_available():
        loaded = load_llava_nf4(folder, "cuda", tmp_path / "cuda-cache")
        assert (loaded.scheme, loaded.reason, loaded.device.type) == ("bf16", "CUDA is not available", "cpu")
        assert not (tmp_path / "cuda-cache").exists()


@pytest.mark.slow  # 1.3 s idle, 5 s on a busy machine: a tiny I2V folder, the cache built, the text stage loaded
def test_quantize_then_the_text_stage_reads_the_cache(tmp_path, image, monkeypatch):
    """`lowvram quantize --only encoder` on I2V weights builds LLaVA's cache where a run with an NF4
    profile and the same --cache-dir reads it, without building it again."""
    require_cpu_nf4()
    root = write_synthetic_checkpoint(tmp_path / "ckpts", "official", "tiny-i2v")
    shutil.rmtree(root / "text_encoder_i2v")
    write_wide_llava(root / "text_encoder_i2v")
    cache = tmp_path / "cache"
    result = quantize_model(root, "fp8", "blocks", "encoder", cache, Reporter())
    assert result["encoder"]["found"] == "missing" and result["encoder"]["path"] == str(cache / LLAVA_CACHE_NAME)
    assert sorted(p.name for p in cache.iterdir()) == [LLAVA_CACHE_NAME]
    again = quantize_model(root, "fp8", "blocks", "encoder", cache, Reporter())
    assert again["encoder"]["found"] == "fresh"

    class Heard(Reporter):
        def __init__(self):
            self.stages, self.warnings = [], []

        def stage(self, name, total=None, completed=0):
            self.stages.append(name)

        def warn(self, message):
            self.warnings.append(message)

    files = find_model_files(root, image_to_video=True)
    profile = Profile(name="test", vram_budget_gb=2.0, dit_scheme="bf16", encoder_scheme="nf4", resident_blocks=4, prefetch_depth=1,
                      token_chunk=0, vae_spatial_tile=0, vae_temporal_tile=0, pin_memory=False)
    found = plan(profile, 64, 48, 5, **model_sizes(files, (48, 64)))
    reporter = Heard()
    stages = Stages(files, found, torch.device("cpu"), "sdpa", reporter, cache_dir=cache)
    quantized, loaded_from = record_loads(monkeypatch)
    llava, _ = stages.text_encoders()
    assert reporter.stages == [] and reporter.warnings == []  # fresh: no "rebuilding", NF4 available
    assert quantized == [(64, 64)] and loaded_from == [str(cache / LLAVA_CACHE_NAME)]  # the probe; the cache
    assert len(four_bit(llava.model)) == 4 * 7
    monkeypatch.undo()
    on_load = LlavaTextEncoder.from_folder(files.llm, "token_replace", model=load_llava_nf4(files.llm, "cpu").model)
    assert torch.equal(llava.encode("A cat walks on the grass.", image)[0], on_load.encode("A cat walks on the grass.", image)[0])


def test_broken_folder_is_a_user_error(llava_folder, tmp_path):
    """A LLaVA folder without its weights: one HyVideoError (NF4 or not), and no cache left behind."""
    folder = tmp_path / "text_encoder_i2v"
    folder.mkdir()
    shutil.copy(llava_folder / "config.json", folder)
    with pytest.raises(HyVideoError, match=r"could not load the text encoder \(LLaVA\)"):
        load_llava_nf4(folder, "cpu", tmp_path / "cache")
    assert not llm_cache_path(tmp_path / "cache", LLAVA_CACHE_NAME).exists()
