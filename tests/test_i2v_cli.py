"""`lowvram generate --image` on tiny random HunyuanVideo-I2V weights (both conditioning types, both
layouts), float32 on the CPU: bad input is one line and exit 2 before anything loads; the image is
in the run's settings, `runs` and --json; a batch line takes "image"; a run killed with SIGKILL
resumes bit-identically and refuses a changed image; the final latents equal diffusers'
HunyuanVideoImageToVideoPipeline (the oracle) loaded from the same folder; the FP8 streamed path
agrees with the float32 resident one within FP8's error."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint
from tests.test_cli import as_json, invoke, one_line_error
from tests.test_cli_subprocess import env, lowvram, manifest, run

# 64x48, 9 frames (3 latent frames of 6x8: 24 image tokens of which the first frame's 12 are the
# image under token_replace), 3 steps: about a second per run once the models are loaded.
SIZE, STEPS = ["--size", "64x48"], 3
TINY = [*SIZE, "--frames", "9", "--steps", str(STEPS), "--seed", "5", "--device", "cpu"]
PROMPT = "A cat walks on the grass."


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """An RGBA PNG of the video's size (alpha dropped on reading), so that diffusers' own resize is
    the identity and both pipelines see the same pixels."""
    y, x = np.mgrid[0:48, 0:64]
    path = tmp_path_factory.mktemp("image") / "cat.png"
    Image.fromarray(np.stack([x * 4, y * 5, (x * y) % 256, np.full_like(x, 200)], -1).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def i2v_official(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("i2v_official"), "official", "tiny-i2v", seed=0)


@pytest.fixture(scope="module")
def i2v_diffusers(tmp_path_factory):
    """Both conditioning types in the diffusers layout (the oracle loads these folders)."""
    return {size: write_synthetic_checkpoint(tmp_path_factory.mktemp(size), "diffusers", size, seed=0)
            for size in ("tiny-i2v", "tiny-i2v-33ch")}


# --- bad input: one line, exit 2, nothing started ------------------------------------------------


def _bad_files(folder: Path, image: Path) -> dict[str, Path]:
    truncated = folder / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:200])
    gif = folder / "cat.gif"
    Image.open(image).convert("RGB").save(gif)
    text = folder / "notes.png"
    text.write_text("not an image")
    return {"missing": folder / "nope.png", "truncated": truncated, "gif": gif, "text": text}


BAD = [
    ("missing", [], "image not found: .*nope.png"),
    ("truncated", [], "cannot read the image .*truncated.png"),
    ("text", [], "cannot read the image .*notes.png.*PNG, JPEG or WebP"),
    ("gif", [], "cat.gif is a GIF image; use PNG, JPEG or WebP"),
    ("ok", ["--frames", "1"], "--frames 1 with --image"),
    ("ok", ["--cache", "safe"], "--cache safe with --image: the step cache's coefficients were fit on the text-to-video DiT"),
    ("ok", ["--aspect", "1:1", "--size", None], "--aspect with --image"),
]


@pytest.mark.parametrize("which,args,message", BAD, ids=[f"{w}{i}" for i, (w, _, _) in enumerate(BAD)])
def test_bad_image_input(i2v_official, image, tmp_path, which, args, message):
    path = image if which == "ok" else _bad_files(tmp_path, image)[which]
    base = list(TINY)
    if None in args:  # this case gives no --size
        args, base = [a for a in args if a is not None and a != "--size"], base[2:]
    runs = tmp_path / "runs"
    result = invoke("generate", PROMPT, "--image", path, "--model-dir", i2v_official, "--runs-dir", runs, *base, *args)
    assert result.exit_code == 2, result.output
    assert re.search(message, one_line_error(result)), one_line_error(result)
    assert not runs.exists() or not any(runs.iterdir())


def test_weights_of_the_other_kind(tiny_official, i2v_official, image, tmp_path):
    t2v = invoke("generate", PROMPT, "--image", image, "--model-dir", tiny_official, "--runs-dir", tmp_path, *TINY)
    assert t2v.exit_code == 2 and "--image needs HunyuanVideo-I2V weights" in one_line_error(t2v)
    no_image = invoke("generate", PROMPT, "--model-dir", i2v_official, "--runs-dir", tmp_path, *TINY)
    assert no_image.exit_code == 2 and "image-to-video model (HunyuanVideo-I2V): pass --image" in one_line_error(no_image)
    assert not any(tmp_path.iterdir())


# --- a run: settings, runs, --json, batch ----------------------------------------------------------


def test_generate_shows_the_image_and_its_bucket(i2v_official, tmp_path):
    """Without --size the video takes the image's bucket (official rule): a 16:9 image at 360p."""
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (320, 180), (200, 100, 50)).save(wide)
    result = invoke("generate", PROMPT, "--image", wide, "--resolution", "360p", "--model-dir", i2v_official,
                    "--runs-dir", tmp_path / "runs", "--frames", "5", "--steps", "1", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = as_json(result)
    settings = data["settings"]
    # 480-base buckets; a wide image takes the closest strictly taller one: 352x608 (0.579), not 352x640 (0.55 < 9/16)
    assert (settings["width"], settings["height"]) == (608, 352)
    assert settings["image"] == str(wide.resolve()) and settings["image_fingerprint"]["file"] == "wide.jpg"
    assert settings["image_condition"] == "token_replace" and settings["stability"]
    folder = Path(data["folder"])
    assert json.loads((folder / "manifest.json").read_text())["image_latent"]["file"] == "image_latent.safetensors"
    listed = as_json(invoke("runs", "--runs-dir", tmp_path / "runs", "--json"))["runs"]
    assert [row["image"] for row in listed] == [str(wide.resolve())]
    table = invoke("runs", "--runs-dir", tmp_path / "runs")
    assert "wide.jpg -> A cat" in table.stdout


def test_batch_lines_take_an_image(i2v_official, image, tmp_path):
    other = tmp_path / "other.png"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "image": str(image), "size": "64x48"}) + "\n"
                       + json.dumps({"prompt": PROMPT, "image": str(other), "size": "64x48"}) + "\n")
    result = invoke("generate", "--prompts", prompts, "--model-dir", i2v_official, "--runs-dir", tmp_path / "runs",
                    "--frames", "5", "--steps", "1", "--seed", "3", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    runs = as_json(result)["runs"]
    assert [r["settings"]["image"] for r in runs] == [str(image.resolve()), str(other.resolve())]
    first, second = (load_file(r["final_latents"])["latents"] for r in runs)
    assert not torch.equal(first[:, :, 0], second[:, :, 0])  # each clip's own image is its first latent frame


# --- resume ------------------------------------------------------------------------------------------


def test_resume_after_sigkill_is_bit_identical_and_refuses_another_image(i2v_official, image, tmp_path):
    steps = 30  # a window of a few seconds to kill in
    args = ["--image", image, *SIZE, "--frames", "9", "--steps", str(steps), "--seed", "21", "--device", "cpu"]
    reference = run("generate", PROMPT, "--model-dir", i2v_official, "--runs-dir", tmp_path / "reference", "--json", *args,
                    timeout=300)
    assert reference.returncode == 0, reference.stderr
    expected = load_file(json.loads(reference.stdout)["final_latents"])["latents"]

    runs_dir = tmp_path / "runs"
    process = subprocess.Popen(lowvram("generate", PROMPT, "--model-dir", i2v_official, "--runs-dir", runs_dir, *args),
                               env=env(), cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((current := manifest(runs_dir)) and current["step"] >= 1):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no step was saved in time"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed = manifest(runs_dir)
    assert killed["state"] == "denoising" and 1 <= killed["step"] < steps

    stamp = image.stat()
    copy = image.read_bytes()
    image.write_bytes(copy[:-1] + bytes([copy[-1] ^ 1]))  # the same size, other contents
    try:
        refused = run("resume", "--runs-dir", runs_dir)
        assert refused.returncode == 2 and "cannot resume run" in refused.stderr and "another image" in refused.stderr
    finally:
        image.write_bytes(copy)
        import os

        os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    resumed = run("resume", "--runs-dir", runs_dir, "--json", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["state"] == "done" and result["resumed_from"].startswith("step ")
    assert load_file(result["final_latents"])["latents"].equal(expected)
