"""The table of DiT quantization schemes (quant/schemes.py): what the cache, the byte accounting and
the stages ask a scheme. The cache's use of `linear_state`, `load` and `versions` is tested in
test_quant_cache.py, `linear_bytes` against the written state dict in test_quant_bytes.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyvideo.config import DIT_CONFIGS
from hyvideo.errors import HyVideoError
from quant.bytes import DIT_SCHEMES
from quant.cache import cache_status
from quant.schemes import QUANT_SCHEMES, quant_scheme

REPO = Path(__file__).resolve().parents[1]


def test_the_table_lists_the_quantized_schemes_and_refuses_others(tmp_path):
    assert list(QUANT_SCHEMES) == ["fp8", "int8"] and DIT_SCHEMES == ("fp8", "int8", "bf16")
    for ask in (lambda: quant_scheme("nf4"), lambda: cache_status(tmp_path, DIT_CONFIGS["tiny"], "bf16")):
        with pytest.raises(HyVideoError, match="unknown DiT quantization scheme .*choose one of fp8, int8"):
            ask()


def test_matmul_choice_per_scheme_on_the_cpu():
    """FP8 reports the path its linears take (the CPU has no FP8 tensor cores: a request for them
    falls back with a note); INT8 leaves the choice to quanto."""
    cpu = torch.device("cpu")
    fp8 = QUANT_SCHEMES["fp8"]
    assert fp8.choose_matmul("dequant", cpu) == ("dequant", None)
    assert fp8.choose_matmul("auto", cpu) == ("dequant", None)
    matmul, note = fp8.choose_matmul("scaled_mm", cpu)
    assert matmul == "dequant" and "unavailable" in note
    assert QUANT_SCHEMES["int8"].choose_matmul("scaled_mm", cpu) == (None, None)


@pytest.mark.slow
def test_byte_accounting_and_the_cache_import_no_quantization_library():
    """`import quant.bytes` (the planner's) and the cache and stages modules read the table without
    importing optimum-quanto or bitsandbytes: those load only when INT8 / NF4 weights are used."""
    code = ("import sys, quant.bytes, quant.cache, lowvram.stages; "
            "print(sorted(m for m in sys.modules if m.startswith(('optimum', 'bitsandbytes'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
