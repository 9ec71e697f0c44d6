"""`lowvram generate --image` on tiny random HunyuanVideo-I2V weights (both conditioning types, both
layouts), float32 on the CPU: bad input is one line and exit 2 before anything loads; the image is
in the run's settings, `runs` and --json; a batch line takes "image"; a run killed with SIGKILL
resumes bit-identically and refuses a changed image; the final latents equal diffusers'
HunyuanVideoImageToVideoPipeline (the oracle) loaded from the same folder; the FP8 streamed path
agrees with the float32 resident one within FP8's error."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint
from tests.helpers import as_json, invoke, killed_after_a_step, one_line_error, run

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


def test_latent_concat_needs_more_than_five_frames(i2v_diffusers, image, tmp_path):
    """latent_concat drops its first 4 decoded frames (official): --frames 5 would leave one."""
    args = ["generate", PROMPT, "--image", image, "--model-dir", i2v_diffusers["tiny-i2v-33ch"], "--runs-dir", tmp_path]
    result = invoke(*args, *SIZE, "--frames", "5", "--steps", "1", "--device", "cpu")
    assert result.exit_code == 2 and one_line_error(result) == (
        "error: --frames 5 with latent_concat I2V weights: their first 4 frames are dropped (as the official code does), "
        "leaving 1; use --frames 9 or more")
    assert not any(tmp_path.iterdir())


def test_weights_of_the_other_kind(tiny_official, i2v_official, image, tmp_path):
    t2v = invoke("generate", PROMPT, "--image", image, "--model-dir", tiny_official, "--runs-dir", tmp_path, *TINY)
    assert t2v.exit_code == 2 and "--image needs HunyuanVideo-I2V weights" in one_line_error(t2v)
    no_image = invoke("generate", PROMPT, "--model-dir", i2v_official, "--runs-dir", tmp_path, *TINY)
    assert no_image.exit_code == 2 and "image-to-video model (HunyuanVideo-I2V): pass --image" in one_line_error(no_image)
    assert not any(tmp_path.iterdir())


# --- a run: settings, runs, --json, batch ----------------------------------------------------------


@pytest.mark.slow
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
    assert [row["input_image"] for row in listed] == [str(wide.resolve())]
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


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical_and_refuses_another_image(i2v_official, image, tmp_path):
    steps = 16  # 0.05-0.2 s a step on 2 busy cores: a window of a second or more to kill in after step 1
    args = ["--image", image, *SIZE, "--frames", "9", "--steps", str(steps), "--seed", "21", "--device", "cpu"]
    reference = invoke("generate", PROMPT, "--model-dir", i2v_official, "--runs-dir", tmp_path / "reference", "--json", *args)
    assert reference.exit_code == 0, reference.output
    expected = load_file(as_json(reference)["final_latents"])["latents"]

    runs_dir = tmp_path / "runs"
    killed = killed_after_a_step(runs_dir, i2v_official, args, timeout=240, prompt=PROMPT)
    assert killed["state"] == "denoising" and 1 <= killed["step"] < steps

    stamp = image.stat()
    copy = image.read_bytes()
    image.write_bytes(copy[:-1] + bytes([copy[-1] ^ 1]))  # the same size, other contents
    try:
        refused = invoke("resume", "--runs-dir", runs_dir)
        assert refused.exit_code == 2 and "cannot resume run" in refused.stderr and "another image" in refused.stderr
    finally:
        image.write_bytes(copy)
        import os

        os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    resumed = invoke("resume", "--runs-dir", runs_dir, "--json")
    assert resumed.exit_code == 0, resumed.output
    result = as_json(resumed)
    assert result["state"] == "done" and result["resumed_from"].startswith("step ")
    assert load_file(result["final_latents"])["latents"].equal(expected)


# --- several GPUs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_equal_one_process(i2v_diffusers, image, tmp_path):
    """`generate --image --gpus 2` as real processes on the CPU (gloo), latent_concat weights in the
    diffusers layout (tests/test_generation_ranks.py runs both types on forked ranks): the final
    latents are one process's within the T2V --gpus bound (tests/test_cli_multigpu.py: 1e-4 on
    latents of about 4, float32 attention summed in another order; measured 4.8e-7), and the run
    records the image as one process does."""
    pytest.importorskip("yunchang")
    folder = i2v_diffusers["tiny-i2v-33ch"]
    args = ["generate", PROMPT, "--image", image, "--model-dir", folder, "--json", *TINY]
    split = run(*args, "--runs-dir", tmp_path / "two", "--gpus", "2", timeout=300)
    alone = invoke(*args, "--runs-dir", tmp_path / "one")
    assert split.returncode == 0, split.stderr
    assert alone.exit_code == 0, alone.output
    two, one = json.loads(split.stdout), as_json(alone)  # one JSON document: the follower prints nothing on stdout
    assert two["settings"]["parallel"] == {"ranks": 2, "ulysses": 2, "ring": 1}
    assert two["settings"]["image_fingerprint"] == one["settings"]["image_fingerprint"]
    torch.testing.assert_close(load_file(two["final_latents"])["latents"], load_file(one["final_latents"])["latents"],
                               rtol=0, atol=1e-4)


# --- parity through the CLI ------------------------------------------------------------------------


def diffusers_final_latents(folder: Path, image: Path, guidance: float, noise: torch.Tensor) -> torch.Tensor:
    """diffusers' HunyuanVideoImageToVideoPipeline from our diffusers-layout folder, float32, with
    the tiny tokenizer's I2V template positions (as tests/test_pipeline_i2v.py drives it)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlavaForConditionalGeneration

    from hyvideo.text_encoder import PROMPT_TEMPLATE_I2V, LlavaTextEncoder, clip_image_processor_class

    llava = LlavaForConditionalGeneration.from_pretrained(folder / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", padding_side="right")
    processor = clip_image_processor_class().from_pretrained(folder / "image_processor")
    ours = LlavaTextEncoder(llava.model, tokenizer, processor, 4)
    start = tokenizer(PROMPT_TEMPLATE_I2V.split("{}")[0])["input_ids"].index(ours.image_token_id)
    n = ours.image_tokens
    template = {"template": PROMPT_TEMPLATE_I2V, "crop_start": ours.crop_start(PROMPT_TEMPLATE_I2V),
                "image_emb_start": start, "image_emb_end": start + n, "image_emb_len": n}
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=llava, tokenizer=tokenizer, image_processor=processor,
        transformer=HunyuanVideoTransformer3DModel.from_pretrained(folder / "transformer").eval(),
        vae=AutoencoderKLHunyuanVideo.from_pretrained(folder / "vae").eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=CLIPTextModel.from_pretrained(folder / "text_encoder_2").eval(),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
    )
    with torch.no_grad():
        return pipe(image=Image.open(image).convert("RGB"), prompt=PROMPT, height=48, width=64, num_frames=9,
                    num_inference_steps=STEPS, guidance_scale=guidance, latents=noise.clone(), output_type="latent",
                    prompt_template=template, max_sequence_length=256).frames


@pytest.mark.slow
@pytest.mark.parametrize("size,guidance", [("tiny-i2v", 6.0), ("tiny-i2v-33ch", 1.0)])  # each release's guidance
def test_cli_final_latents_match_diffusers(i2v_diffusers, image, tmp_path, size, guidance):
    """End to end from the image file through `generate --image` (default stable mode: flow shift 7,
    0.999 noise + 0.001 image latent, as diffusers always runs). Tolerance 1e-5 relative, float32:
    the DiT agrees to ~4e-7 per forward and the schedule (shifted in float64 here, float32 there)
    adds ~5e-6 at shift 7 (tests/test_pipeline_i2v.py); a wrong rule shows as > 1e-2."""
    from hyvideo.sampler import initial_noise

    folder = i2v_diffusers[size]
    result = invoke("generate", PROMPT, "--image", image, "--model-dir", folder, "--runs-dir", tmp_path, "--guidance", guidance,
                    "--json", *TINY)
    assert result.exit_code == 0, result.output
    data = as_json(result)
    assert data["settings"]["profile"]["dit_scheme"] == "bf16"  # plain on the CPU: float32 weights, all resident
    ours = load_file(data["final_latents"])["latents"]
    noise = initial_noise(tuple(data["settings"]["latent_shape"]), 5)
    theirs = diffusers_final_latents(folder, image, guidance, noise)
    if size == "tiny-i2v-33ch":
        ours = ours[:, :, 1:]  # diffusers returns latent_concat latents without the first frame
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"{size}: max |ours - diffusers| / max |diffusers| = {err:.3e}")
    assert ours.shape == theirs.shape and err <= 1e-5


def _profile(folder: Path, name: str, resident: int, dit_scheme: str = "fp8") -> Path:
    """The 16 GB card's code path at the tiny model's scale (as `lowvram demo`'s): FP8 DiT from the
    quantize-once cache, `resident` blocks resident and the rest streamed, token chunks of 16, the VAE
    in 4x4-latent tiles (the image's encode too: 32 px tiles)."""
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\ndescription = "test"\nvram_budget_gb = 2.0\ndit_scheme = "{dit_scheme}"\nquant_policy = "blocks"\n'
                    f'resident_blocks = {resident}\nprefetch_depth = 1\ntoken_chunk = 16\nencoder_scheme = "bf16"\n'
                    'vae_spatial_tile = 4\nvae_temporal_tile = 4\npin_memory = true\npinned_ram_cap_gb = 1.0\n')
    return path


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny-i2v", "tiny-i2v-33ch"])
def test_fp8_streamed_agrees_with_float32_resident(i2v_diffusers, image, tmp_path, size):
    """Streaming changes nothing (FP8 with 1 of 4 blocks resident equals FP8 all resident, bit for
    bit, the first frame's own modulation going through the token chunks); FP8 itself stays within
    its error against float32: measured 0.20 % (token_replace) and 0.24 % (latent_concat) on the
    final latents after 3 steps (the DiT's ~3 % per forward, tests/test_quant_dit.py, enters
    through the Euler steps' sigma differences); bound 2 %. The float32 reference encodes the image
    in the same tiles (whole vs tiled is another conditioning latent, not FP8's error)."""
    folder = i2v_diffusers[size]

    def final(profile: Path) -> torch.Tensor:
        result = invoke("generate", PROMPT, "--image", image, "--model-dir", folder, "--runs-dir", tmp_path / "runs",
                        "--cache-dir", tmp_path / "cache", "--json", *TINY, "--profile", profile)
        assert result.exit_code == 0, result.output
        return load_file(as_json(result)["final_latents"])["latents"]

    reference = final(_profile(tmp_path, "float32", 4, dit_scheme="bf16"))  # bf16 = unquantized: float32 on the CPU
    streamed, resident = final(_profile(tmp_path, "streamed", 1)), final(_profile(tmp_path, "resident", 4))
    assert torch.equal(streamed, resident)
    err = ((streamed - reference).norm() / reference.norm()).item()
    print(f"{size}: FP8 vs float32 final latents, relative error {err:.3e}")
    assert err < 0.02


@pytest.mark.slow
def test_a_tencent_lora_on_the_token_replace_dit(i2v_official, image, tmp_path):
    """`generate --image --lora` with Tencent's I2V LoRA format (kohya's layout under the prefix
    `Hunyuan_video_I2V_lora_`, as its `*_kohaya_weights.safetensors`): the I2V DiT has the
    text-to-video DiT's linears, so it applies as on text-to-video: strength 0 is no LoRA, 1
    changes the clip."""
    from tests.test_lora import BLOCK_LINEARS, TENCENT_PREFIX, kohya_lora, write

    tensors = {TENCENT_PREFIX + k.removeprefix("lora_unet_"): v for k, v in kohya_lora(2, BLOCK_LINEARS, alpha=4.0).items()}
    lora = write(tmp_path, "effect_kohaya_weights.safetensors", tensors)

    def final(*args) -> torch.Tensor:
        result = invoke("generate", PROMPT, "--image", image, "--model-dir", i2v_official, "--runs-dir", tmp_path / "runs",
                        "--json", *TINY, *args)
        assert result.exit_code == 0, result.output
        return load_file(as_json(result)["final_latents"])["latents"]

    plain = final()
    assert torch.equal(final("--lora", f"{lora}:0"), plain)
    assert not torch.equal(final("--lora", str(lora)), plain)


@pytest.mark.slow
def test_an_img_in_lora_on_the_latent_concat_dit(i2v_diffusers, image, tmp_path):
    """latent_concat (33 input channels): a diffusers-format LoRA with an img_in (x_embedder) entry
    at 33 channels changes the clip and is recorded; one made for 16 channels is refused before
    anything loads (one line, exit 2)."""
    from tests.test_lora import img_in_lora, write

    common = ["--image", image, "--model-dir", i2v_diffusers["tiny-i2v-33ch"], "--runs-dir", tmp_path / "runs", "--json", *TINY]
    plain = invoke("generate", PROMPT, *common)
    lora = write(tmp_path, "x_embedder.safetensors", img_in_lora(3, 33))
    with_lora = invoke("generate", PROMPT, *common, "--lora", lora)
    assert plain.exit_code == 0 and with_lora.exit_code == 0, with_lora.output
    assert [e["path"] for e in as_json(with_lora)["settings"]["loras"]] == [str(lora)]
    assert as_json(with_lora)["stats"]["lora"]["linears"] == 1
    latents = [load_file(as_json(r)["final_latents"])["latents"] for r in (plain, with_lora)]
    assert not torch.equal(*latents)
    narrow = write(tmp_path, "t2v_img_in.safetensors", img_in_lora(4, 16))
    refused = invoke("generate", PROMPT, *common, "--lora", narrow)
    assert refused.exit_code == 2
    assert "made for a DiT with 16 input channels; this one has 33" in one_line_error(refused)
    runs = [f for f in (tmp_path / "runs").iterdir() if f.is_dir()]
    assert len(runs) == 2  # the refused run started nothing
