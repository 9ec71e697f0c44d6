"""The step cache benchmark runs end to end on the tiny model (CPU), short: what the GPU call runs."""

from bench.bench_step_cache import main


def test_step_cache_bench_tiny(tmp_path):
    results = main(["--tiny", "--steps", "6", "--video", "64x48x9", "--scratch", str(tmp_path / "scratch"), "--out", str(tmp_path)])
    off, safe, fast = results["runs"]
    assert off["dit_forwards"] == 6 and "latents_rel_error" not in off
    for run in (safe, fast):
        assert run["computed_steps"][0] == 0 and run["computed_steps"][-1] == 5  # first and last always run
        assert run["dit_forwards"] < 6 and run["latents_rel_error"] > 0 and run["frames_psnr_db"] > 20
    assert list(tmp_path.glob("step_cache-tiny-*.json")) and list(tmp_path.glob("step_cache-tiny-*.md"))
