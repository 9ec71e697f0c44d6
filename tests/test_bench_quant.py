"""The quantization benchmark runs end to end on the tiny config (CPU)."""

from bench.bench_quant import main


def test_quant_bench_tiny(tmp_path):
    results = main(["--tiny", "--out", str(tmp_path)])
    schemes = {run["scheme"]: run for run in results["runs"]}
    assert set(schemes) == {"bf16", "fp8-dequant", "fp8-scaled-mm", "int8-quanto"}
    # Random tiny weights: FP8 rounding costs a few percent, INT8 about 1 % (see quant tests).
    assert 0 < schemes["fp8-dequant"]["rel_error_vs_bf16"] < 0.1
    assert 0 < schemes["int8-quanto"]["rel_error_vs_bf16"] < 0.1
    assert "skipped" in schemes["fp8-scaled-mm"]  # no FP8 tensor cores on the CPU
    assert list(tmp_path.glob("quant_forward-tiny-*.json"))
