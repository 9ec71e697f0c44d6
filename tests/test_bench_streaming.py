"""The streaming benchmark runs end to end on the CPU with --tiny (the GPU run uses the same code)."""

import json

from bench.bench_streaming import main


def test_bench_streaming_tiny(tmp_path):
    assert main(["--tiny", "--out", str(tmp_path), "--budget-s", "120"]) == 0
    data = json.loads(next(tmp_path.glob("bench_streaming-tiny-*.json")).read_text())
    runs = [(r["run"], r.get("cap_gb")) for r in data["results"]]
    assert ("resident", None) in runs and ("stream", 16.0) in runs and ("stream", 24.0) in runs
    assert ("vae-decode-tile", None) in runs and runs[-1] == ("done", None)
    for record in data["results"]:
        assert "error" not in record, record.get("traceback")
    streamed = next(r for r in data["results"] if r["run"] == "stream" and r["cap_gb"] == 16.0)
    assert streamed["resident_blocks"] == 2 and streamed["streamed_gb_per_step"] > 0 and streamed["finite"]
    assert len(streamed["step_s"]) == 2
    table = next(tmp_path.glob("bench_streaming-tiny-*.md")).read_text()
    assert table.count("\n| 32x48x9 |") >= 3
