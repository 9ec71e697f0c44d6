"""The NF4 LLM encoder on the tiny Llama folder, and the bf16 fallback when bitsandbytes can't run."""

import sys

import pytest
import torch

from hyvideo.errors import HyVideoError
from hyvideo.synthetic_checkpoint import write_text_encoder
from quant.nf4 import load_llm_bf16, load_llm_nf4, nf4_unavailable_reason


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


def rel_err(a, b):
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN error"
    return err


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
