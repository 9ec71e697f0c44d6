"""Byte accounting: the 13B numbers against facts §1.1 / §1.14, and agreement with the bytes the
quantizers really produce (tiny config)."""

import pytest
import torch

from hyvideo.config import DIT_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from quant.bytes import block_bytes, llm_nf4_bytes, llm_param_counts, weight_bytes
from quant.cache import quantized_tensors
from quant.policy import POLICIES

FULL = DIT_CONFIGS["HYVideo-T/2-cfgdistill"]
TINY = DIT_CONFIGS["tiny"]

TOTAL_PARAMS = 12_821_012_544  # facts §1.1
QUANTIZED_ELEMENTS = 12_457_082_880  # facts §1.14: the 320 block linear weights
# Output channels of the 320 layers: per double block 2 x (18432 + 9216 + 3072 + 12288 + 3072),
# per single block 21504 + 3072 + 9216 (facts §1.12 shapes).
OUT_CHANNELS = 20 * 2 * 46080 + 40 * 33792
# Modulation linears: 2 x [18432, 3072] per double block, [9216, 3072] per single block.
MOD_ELEMENTS = 20 * 2 * 18432 * 3072 + 40 * 9216 * 3072


def test_13b_fp8_blocks():
    b = weight_bytes(FULL, "fp8", "blocks")
    assert b.quantized_elements == QUANTIZED_ELEMENTS
    assert b.unquantized_elements == TOTAL_PARAMS - QUANTIZED_ELEMENTS == 363_929_664
    assert b.quantized_bytes == QUANTIZED_ELEMENTS + 4 * OUT_CHANNELS  # 1 B/elt + float32 scale per row
    assert b.unquantized_bytes == 2 * b.unquantized_elements
    assert b.total == b.quantized_bytes + b.unquantized_bytes == 13_197_721_728  # ~13.2 GB (facts §1.14)


def test_13b_int8_and_bf16():
    b = weight_bytes(FULL, "int8", "blocks")
    assert b.quantized_elements == QUANTIZED_ELEMENTS
    assert b.quantized_bytes == QUANTIZED_ELEMENTS + 2 * OUT_CHANNELS + 320 * 2 * 2  # bf16 scales + 2 scalars
    bf16 = weight_bytes(FULL, "bf16")
    assert bf16.quantized_elements == 0 and bf16.total == 2 * TOTAL_PARAMS  # 25.6 GB (facts §1.13)


def test_13b_blocks_no_mod():
    b = weight_bytes(FULL, "fp8", "blocks-no-mod")
    assert b.quantized_elements == QUANTIZED_ELEMENTS - MOD_ELEMENTS == 9_059_696_640
    extra = b.total - weight_bytes(FULL, "fp8", "blocks").total
    assert 3.39e9 < extra < 3.40e9  # 1 extra byte per modulation weight, minus their scales


def test_13b_block_bytes():
    double, single = block_bytes(FULL, "fp8", "blocks", "double"), block_bytes(FULL, "fp8", "blocks", "single")
    assert double.quantized_elements + double.unquantized_elements == 339_831_296  # facts §1.1 per double block
    assert single.quantized_elements + single.unquantized_elements == 141_591_808  # facts §1.1 per single block
    rest = weight_bytes(FULL, "bf16").total - 20 * 339_831_296 * 2 - 40 * 141_591_808 * 2
    assert weight_bytes(FULL, "fp8").total == 20 * double.total + 40 * single.total + rest
    assert block_bytes(FULL, "bf16", kind="single").total == 2 * 141_591_808
    with pytest.raises(ValueError):
        block_bytes(FULL, "fp8", "blocks", "triple")


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_accounting_matches_quantized_state_dict(scheme, policy):
    """The formula equals the bytes of the state dict the cache writes (tiny config, meta tensors)."""
    with torch.device("meta"):
        state = HunyuanVideoDiT(TINY).state_dict()
    actual = sum(t.numel() * t.element_size() for _, t in quantized_tensors(state, TINY, scheme, policy))
    assert weight_bytes(TINY, scheme, policy).total == actual


def test_llm_nf4_bytes():
    import bitsandbytes.functional as bnbf

    weight = torch.randn(256, 512, dtype=torch.bfloat16)  # 2048 blocks of 64 = 8 second-level blocks of 256
    try:
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    except Exception as error:  # no usable CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on the CPU here: {error}")
    actual = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    actual += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert llm_nf4_bytes(weight.numel()) == actual
    assert llm_nf4_bytes(weight.numel(), double_quant=False) == weight.numel() // 2 + 4 * weight.numel() // 64


def test_llama3_8b_nf4_estimate():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)
    linear, other = llm_param_counts(config)
    assert linear == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # q,o + k,v (GQA 8) + MLP
    assert other == 128256 * 4096 + (2 * 32 + 1) * 4096  # embeddings + norms
    nf4 = llm_nf4_bytes(linear, other)
    assert 4.6e9 < nf4 < 4.7e9  # vs 15.0 GB in bf16
