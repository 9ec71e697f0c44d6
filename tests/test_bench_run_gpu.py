"""bench/run_gpu.sh's own logic on the CPU, without its measurements: a budget too small for any
step packs an archive anyway (setup done, every step skipped and listed), the image-to-video line
(I2V=1) lists its own steps after freeing the disk and writing its image, the HunyuanVideo-1.5
line (V15=1) its own after freeing the disk, and a wheel that does not
install stops the run with one line. (The whole rehearsal, REHEARSE=1 with or without I2V=1 or V15=1, takes
minutes: it is run by hand before a GPU run, and its step times are in the report that changed the
script; `lowvram bench --image` and `--model 1.5-...` themselves are tests/test_cli_bench.py's.)"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["write-model", "lowvram-bench-720p-16gb", "lowvram-bench-720p-16gb-compile", "lowvram-bench-540p-8gb",
         "cuda-tests", "attention", "diffusers-16gb", "lowvram-bench-720p-12gb"]
I2V_STEPS = ["write-model-i2v", "lowvram-bench-i2v-720p-16gb"]
V15_STEPS = ["write-model-v15", "lowvram-bench-v15-720p-16gb"]


def run_script(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    values = {**os.environ, "REHEARSE": "1", "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
              "SCRATCH": str(tmp_path / "scratch"), "SITE": str(tmp_path / "site"),
              "WHEELS_DIR": str(tmp_path / "no-wheels"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "bench/run_gpu.sh")], cwd=ROOT, env=values, capture_output=True,
                          text=True, timeout=600)


def archive(tmp_path: Path) -> dict[str, bytes]:
    with tarfile.open(tmp_path / "out/gpu-results.tar.gz") as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def rehearsed_without_budget(tmp_path: Path, steps: list[str], **env) -> dict[str, bytes]:
    """The script rehearsed with no time budget: it exits 0 and lists `steps`, each skipped; the
    archive it packed."""
    done = run_script(tmp_path, BUDGET_S="0", **env)
    assert done.returncode == 0, done.stdout + done.stderr
    files = archive(tmp_path)
    rows = [line.split("\t") for line in files["steps.tsv"].decode().splitlines()[1:]]
    assert [row[0] for row in rows] == steps and all(row[1] == "skipped" for row in rows)
    return files


@pytest.mark.slow
def test_no_budget_skips_every_step_and_still_packs_the_archive(tmp_path):
    files = rehearsed_without_budget(tmp_path, STEPS)
    assert {"progress.log", "steps.tsv", "imports.txt"} <= files.keys()
    assert b"av: " in files["imports.txt"] and (tmp_path / "out/progress.log").read_text().count("skip ") == len(STEPS)


@pytest.mark.slow
def test_the_i2v_line_frees_the_disk_writes_its_image_and_lists_its_steps(tmp_path):
    """I2V=1 runs the image-to-video line alone: the text-to-video model folders in the scratch go
    first (the I2V folder does not fit the device's disk beside them), the 16:9 image larger than
    its bucket is written, and its two steps are listed (skipped: no budget)."""
    from PIL import Image

    t2v = tmp_path / "scratch/model-tiny-official-fp8"
    t2v.mkdir(parents=True)
    files = rehearsed_without_budget(tmp_path, I2V_STEPS, I2V="1")
    assert "image-to-video" in files["progress.log"].decode()
    assert not t2v.exists() and Image.open(tmp_path / "scratch/i2v-first-frame.png").size == (1920, 1080)


@pytest.mark.slow
def test_the_v15_line_frees_the_13b_models_and_lists_its_steps(tmp_path):
    """V15=1 runs the HunyuanVideo-1.5 line alone: the 13B model folders in the scratch go first
    (disk), a 1.5 folder already written stays (reused), and its two steps are listed (skipped: no
    budget)."""
    t2v, v15 = tmp_path / "scratch/model-tiny-official-fp8", tmp_path / "scratch/model-tiny-1.5-720p_t2v-diffusers"
    t2v.mkdir(parents=True)
    v15.mkdir()
    files = rehearsed_without_budget(tmp_path, V15_STEPS, V15="1")
    assert "HunyuanVideo-1.5" in files["progress.log"].decode()
    assert not t2v.exists() and v15.exists()


@pytest.mark.slow
def test_a_wheel_that_does_not_install_stops_the_run_with_one_line(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    done = run_script(tmp_path, WHEELS_DIR=str(wheels), BUDGET_S="0")
    assert done.returncode == 1
    stops = [line for line in done.stdout.splitlines() if "stop:" in line]
    assert len(stops) == 1 and "installing the wheels in" in stops[0]
    assert "steps.tsv" in archive(tmp_path)  # what was done is packed: the setup's logs


@pytest.mark.parametrize("missing", ["av"])
@pytest.mark.slow
def test_a_package_the_runs_need_stops_the_run_before_any_step(tmp_path, missing):
    """The product's own check (lowvram/generation/packages.py) in the setup: PyAV hidden by a
    module that fails to import makes the run stop before step 1."""
    shadow = tmp_path / "shadow"
    (shadow / missing).mkdir(parents=True)
    (shadow / missing / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    done = run_script(tmp_path, PYTHONPATH=f"{shadow}{os.pathsep}{ROOT}", BUDGET_S="0")
    assert done.returncode == 1, done.stdout
    assert "MISSING" in archive(tmp_path)["imports.txt"].decode()
    assert "start write-model" not in done.stdout
