"""HunyuanVideo-1.5's Qwen2.5-VL language model in NF4 (quant/nf4.py `load_qwen_text_nf4`), from
Tencent's folder layout (the whole Qwen2.5-VL: only the language model is loaded and quantized)."""

import pytest
import torch

from hyvideo.v15_text import load_qwen_text_model
from quant.nf4 import LLM_CACHE_HEADER, llm_cache_path, load_qwen_text_nf4, nf4_unavailable_reason
from tests.helpers import rel_err
from tests.tiny_v15_text import tiny_qwen


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen") / "llm"
    model, tokenizer = tiny_qwen(seed=3, hidden=64)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def states(model):
    ids = torch.arange(1, 41).reshape(1, 40) * 7 % 500
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-3].float()


def test_qwen_nf4_on_cpu_or_fallback(qwen_folder):
    from transformers import Qwen2_5_VLTextModel

    reference = load_qwen_text_model(qwen_folder, torch.bfloat16)
    reason = nf4_unavailable_reason("cpu")
    loaded = load_qwen_text_nf4(qwen_folder, "cpu")
    assert isinstance(loaded.model, Qwen2_5_VLTextModel)  # no vision tower, no LM head
    if reason is not None:  # bitsandbytes without a CPU backend: the fallback is the contract
        assert loaded.scheme == "bf16" and loaded.reason == reason
        assert torch.equal(states(loaded.model), states(reference))
        return
    import bitsandbytes as bnb

    assert loaded.scheme == "nf4" and loaded.reason is None
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules()) == 4 * 7  # q k v o gate up down x 4 layers
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    # NF4 costs ~9 % per linear (measured on one 64->32 layer); these weights (std 1/sqrt(fan_in),
    # 6x the Llama fixture's initializer range of tests/test_quant_nf4.py) make attention sharp, so
    # it grows faster per layer: measured 27 % after layer 1 and 34 % at hidden_states[-3] (the
    # Llama fixture: 6 % and 10 %). Another seed's weights give 144 %.
    assert rel_err(states(loaded.model), states(reference)) < 0.50


def test_qwen_nf4_without_cuda_falls_back(qwen_folder):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    loaded = load_qwen_text_nf4(qwen_folder, "cuda")
    assert loaded.scheme == "bf16" and loaded.reason == "CUDA is not available" and loaded.device.type == "cpu"


@pytest.mark.slow  # ~4-5 s: three NF4 loads
def test_qwen_nf4_cache_round_trip(qwen_folder, tmp_path):
    """Built once from the whole Qwen2.5-VL (only the language model saved), then loaded as it is
    (fresh: no build): the same outputs as the model quantized on load."""
    if nf4_unavailable_reason("cpu") is not None:
        pytest.skip("bitsandbytes cannot run NF4 on this CPU")
    statuses = []
    built = load_qwen_text_nf4(qwen_folder, "cpu", cache_dir=tmp_path, on_status=statuses.append)
    assert built.scheme == "nf4" and [s.state for s in statuses] == ["missing"]
    assert sorted(p.name for p in llm_cache_path(tmp_path).iterdir()) == ["config.json", LLM_CACHE_HEADER, "model.safetensors"]
    cached = load_qwen_text_nf4(qwen_folder, "cpu", cache_dir=tmp_path, on_status=statuses.append)
    assert cached.scheme == "nf4" and len(statuses) == 1 and type(cached.model).__name__ == "Qwen2_5_VLTextModel"
    expected = states(load_qwen_text_nf4(qwen_folder, "cpu").model)
    assert torch.equal(states(built.model), expected) and torch.equal(states(cached.model), expected)


def test_quantize_builds_the_cache_a_v15_run_reads(tmp_path):
    """`lowvram quantize --only encoder` on a HunyuanVideo-1.5 folder builds the Qwen2.5-VL NF4
    cache where a run of that transformer looks (its cache folder), and the run's load finds it
    fresh: no second quantization."""
    if nf4_unavailable_reason("cpu") is not None:
        pytest.skip("bitsandbytes cannot run NF4 on this CPU")
    import shutil

    from hyvideo.checkpoint import find_model_files
    from hyvideo.v15_text import find_v15_text_files
    from lowvram.progress import Reporter
    from lowvram.setup.quantize import quantize_model
    from lowvram.setup.synthetic_v15 import write_v15_checkpoint
    from lowvram.stages import default_cache_dir
    from tests.tiny_v15_text import write_official_encoders

    root = tmp_path / "ckpts"
    write_v15_checkpoint(root, "official", "tiny")
    write_official_encoders(root)
    llm = find_v15_text_files(root, "official").llm
    shutil.rmtree(llm)  # 64 wide: bitsandbytes' CPU kernel takes it (the tiny default is too narrow)
    model, tokenizer = tiny_qwen(seed=3, hidden=64)
    model.save_pretrained(llm)
    tokenizer.save_pretrained(llm)

    result = quantize_model(root, "fp8", "blocks", "encoder", None, Reporter())
    cache = default_cache_dir(find_model_files(root))
    assert result["cache_dir"] == str(cache) and result["encoder"]["path"] == str(llm_cache_path(cache))
    assert result["encoder"]["found"] == "missing"  # built now
    statuses = []
    loaded = load_qwen_text_nf4(llm, "cpu", cache_dir=cache, on_status=statuses.append)
    assert loaded.scheme == "nf4" and statuses == []  # fresh: read, not rebuilt
