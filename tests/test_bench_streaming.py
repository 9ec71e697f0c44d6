"""The streaming benchmark runs end to end on the CPU with --tiny (the GPU run uses the same code)."""

import json

import pytest

from bench.bench_streaming import main


@pytest.mark.slow
def test_bench_streaming_tiny(tmp_path):
    assert main(["--tiny", "--out", str(tmp_path), "--budget-s", "120"]) == 0
    data = json.loads(next(tmp_path.glob("bench_streaming-tiny-*.json")).read_text())
    runs = [(r["run"], r.get("cap_gb")) for r in data["results"]]
    assert ("resident", None) in runs and ("stream", 16.0) in runs and ("stream", 24.0) in runs
    assert ("vae-decode-tile", None) in runs and runs[-1] == ("done", None)
    for record in data["results"]:
        assert "error" not in record, record.get("traceback")
    streamed = next(r for r in data["results"] if r["run"] == "stream" and r["cap_gb"] == 16.0)
    assert streamed["resident_blocks"] == streamed["streamed_blocks"] == 2 and streamed["finite"]
    assert len(streamed["step_s"]) == 2
    # each step copies the 2 streamed blocks, the same bytes every step, and reports the last
    copied = [(s["blocks_copied"], s["bytes_copied"]) for s in streamed["steps_stats"]]
    assert [blocks for blocks, _ in copied] == [2, 2] and copied[0][1] == copied[1][1] > 0
    assert streamed["streamed_gb_per_step"] == copied[-1][1] / 2**30
    table = next(tmp_path.glob("bench_streaming-tiny-*.md")).read_text()
    assert table.count("\n| 32x48x9 |") >= 3
