"""The GPU forward benchmark runs end to end on the tiny config (CPU)."""

import json

from bench.bench_dit_forward import main


def test_dit_forward_bench_tiny(tmp_path):
    results = main(["--tiny", "--repeats", "1", "--out", str(tmp_path)])
    assert results["runs"] and all("s_per_forward" in run for run in results["runs"])
    saved = json.loads(next(tmp_path.glob("dit_forward-tiny-*.json")).read_text())
    assert saved["runs"][0]["size"] == "64x48x9"
