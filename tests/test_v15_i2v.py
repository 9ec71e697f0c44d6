"""HunyuanVideo-1.5 through `lowvram generate` against diffusers' HunyuanVideo15Pipeline and
HunyuanVideo15ImageToVideoPipeline loaded from the same synthetic folder (diffusers layout, tiny
random weights and the tiny encoders of tests/tiny_v15_text.py), fp32: from a prompt with quoted
text (T2V) and from an image file (I2V, with real CFG and the MeanFlow step-distilled transformer);
an I2V run stopped after a step and resumed equals the whole run without encoding again; the text
stage's two phases against the plan; bad input refused before a model loads.

Bucket size: the released 480p base (640) makes a 512x784 tiny video from any image, 25 s of tiny
VAE on the CPU; the tests give both sides a 64 px base instead (`TARGET_SIZE`, diffusers'
`pipe.target_size`), which changes only which bucket is picked.

Tolerance: 1e-5 relative, as tests/test_v15_pipeline.py: the same float32 math in another order
(fused projections, our attention) differs by ~3e-7 a forward, which real CFG multiplies by up to
2g - 1 = 11 over 3 steps (observed below 2e-6). Both loops get the same sigmas (`same_schedule`:
diffusers shifts them in float32, ours in float64, one ulp apart at some steps).
"""

import dataclasses
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("diffusers")  # the oracle: `pytest -m cuda` collects without it (tests/test_cuda_collection.py)
from diffusers import (
    AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel,
)
from transformers import AutoTokenizer, Qwen2_5_VLTextModel, SiglipVisionModel, T5EncoderModel

from bench.memtrack import PeakTracker
from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest
from hyvideo.sampler import initial_noise
from hyvideo.v15_image import TARGET_SIZE, siglip_processor_class
from lowvram.generation.preflight import RunOptions, start_run
from lowvram.generation.run_folder import find_run
from lowvram.generation.runner import DEMO_PROFILE, RunInterrupted, StopRequest, _Execution, execute, resume_run
from lowvram.planner import plan
from lowvram.progress import Reporter
from lowvram.setup.synthetic_v15 import SIZES, write_v15_checkpoint
from lowvram.stages import Stages, model_sizes
from tests.helpers import StopAfter, as_json, invoke
from tests.test_v15_pipeline import same_schedule
from tests.tiny_v15_text import write_diffusers_encoders

TARGET = 64  # the tiny bucket base (released: 640 at 480p, 960 at 720p)
TOL = 1e-5
PROMPT = 'a fox holding a sign that says "OPEN LATE", realistic'
STREAMED = dataclasses.replace(DEMO_PROFILE, vae_spatial_tile=8, pin_memory=False)  # FP8, 1 of 2 blocks resident, 64 px tiles
STEP_DISTILLED = dataclasses.replace(SIZES["tiny-i2v"], variant="480p_i2v_step_distilled",
                                     dit=dataclasses.replace(SIZES["tiny-i2v"].dit, use_meanflow=True))


def tiny_folder(root: Path, size) -> Path:
    write_v15_checkpoint(root, "diffusers", size)
    return write_diffusers_encoders(root)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("v15i2v")
    return {"480p_t2v": tiny_folder(base / "t2v", "tiny"), "480p_i2v": tiny_folder(base / "i2v", "tiny-i2v"),
            "480p_i2v_step_distilled": tiny_folder(base / "step", STEP_DISTILLED)}


@pytest.fixture(autouse=True)
def tiny_buckets(monkeypatch):
    monkeypatch.setitem(TARGET_SIZE, "480p", TARGET)


def write_image(path: Path, width: int, height: int, seed: int = 15) -> Path:
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def rel_err(ours, expected) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


def generate(root: Path, runs: Path, *args) -> dict:
    """`lowvram generate --json` in this process (profile plain: the DiT and encoders unquantized,
    float32 on the CPU, the VAE whole), its final latents and settings."""
    done = invoke("generate", PROMPT, "--model-dir", root, "--runs-dir", runs, "--frames", 9, "--steps", 3, "--seed", 5,
                  "--device", "cpu", "--profile", "plain", "--json", *args)
    assert done.exit_code == 0, done.stderr
    run = find_run(runs, as_json(done)["run_id"])
    return {"latents": run.load_final(), "settings": run.settings}


def oracle(root: Path, pipeline_class, guidance: float, **components):
    """diffusers' pipeline from the folder's own files, loaded by diffusers and transformers."""
    pipe = pipeline_class(
        transformer=HunyuanVideo15Transformer3DModel.from_pretrained(root / "transformer"),
        vae=AutoencoderKLHunyuanVideo15.from_pretrained(root / "vae"),
        text_encoder=Qwen2_5_VLTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(root / "text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), guider=ClassifierFreeGuidance(guidance_scale=guidance),
        **components,
    )
    return pipe.to(torch.float32)


@pytest.mark.slow  # ~20 s: the tiny encoders over 1000 + 256 tokens, 3 steps x 2 forwards, both sides
def test_t2v_generate_matches_diffusers(folders, tmp_path):
    root = folders["480p_t2v"]
    ours = generate(root, tmp_path / "runs", "--size", "96x64")
    settings = ours["settings"]
    assert (settings["guidance"], settings["flow_shift"]) == (6.0, 5.0)  # 480p_t2v's defaults: real CFG
    pipe = oracle(root, HunyuanVideo15Pipeline, settings["guidance"])
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, height=64, width=96, num_frames=9, num_inference_steps=3, output_type="latent",
                        latents=initial_noise(tuple(settings["latent_shape"]), 5), return_dict=False,
                        **same_schedule(3, settings["flow_shift"]))[0]
    assert rel_err(ours["latents"], expected) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["480p_i2v", "480p_i2v_step_distilled"])
def test_i2v_generate_matches_diffusers(folders, tmp_path, variant):
    """From an image file wider than tall and off-bucket; the step-distilled transformer runs one
    forward a step (guidance 1) with MeanFlow's `timestep_r`."""
    root = folders[variant]
    image = write_image(tmp_path / "first.png", 70, 45)
    ours = generate(root, tmp_path / "runs", "--image", image)
    settings = ours["settings"]
    assert settings["model"] == f"1.5-{variant}" and settings["guidance"] == (6.0 if variant == "480p_i2v" else 1.0)
    vision = SiglipVisionModel.from_pretrained(root / "image_encoder")
    processor = siglip_processor_class().from_pretrained(root / "feature_extractor")
    pipe = oracle(root, HunyuanVideo15ImageToVideoPipeline, settings["guidance"], image_encoder=vision, feature_extractor=processor)
    assert pipe.transformer.config.use_meanflow == (variant == "480p_i2v_step_distilled")
    pipe.target_size = TARGET
    with torch.no_grad():
        expected = pipe(image=PIL.Image.open(image), prompt=PROMPT, num_frames=9, num_inference_steps=3, output_type="latent",
                        latents=initial_noise(tuple(settings["latent_shape"]), 5), return_dict=False,
                        **same_schedule(3, settings["flow_shift"]))[0]
    assert expected.shape == ours["latents"].shape and rel_err(ours["latents"], expected) <= TOL


def i2v_options(root: Path, runs: Path, image: Path) -> RunOptions:
    request = GenerationRequest(PROMPT, frames=9, seed=3, steps=3, image=str(image))
    return RunOptions(request, root, runs, STREAMED, device="cpu", sampling_given=frozenset({"steps"}))


@pytest.mark.slow
def test_i2v_resume_is_bit_identical_without_encoding_again(folders, tmp_path, monkeypatch):
    """The FP8 DiT streamed under real CFG; a wide image so the VAE encodes it in 2 tiles of 64 px."""
    root = folders["480p_i2v"]
    image = write_image(tmp_path / "first.png", 120, 50, seed=4)
    run, files, found = start_run(i2v_options(root, tmp_path / "a", image))
    assert (run.settings["width"], run.settings["height"]) == (80, 48)  # the tiny bucket for 12:5
    whole = execute(run, files, found)
    assert whole.state == "done" and whole.stats["image_encode"]["tiles"] == 2

    run, files, found = start_run(i2v_options(root, tmp_path / "b", image))
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, found, StopAfter(stop, 1), stop)
    assert find_run(tmp_path / "b", run.id).step == 1

    original, stat = image.read_bytes(), image.stat()
    write_image(image, 120, 50, seed=5)
    with pytest.raises(HyVideoError, match="cannot resume run .* with another image"):
        resume_run(tmp_path / "b", run.id)
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    def not_again(self):
        raise AssertionError("a resume in denoising encodes nothing")

    monkeypatch.setattr(Stages, "v15_text_encoder", not_again)
    monkeypatch.setattr(Stages, "v15_image_encoder", not_again)
    resumed = resume_run(tmp_path / "b", run.id)
    assert resumed.resumed_from == "step 1/3"
    assert torch.equal(find_run(tmp_path / "b", run.id).load_final(), find_run(tmp_path / "a", whole.run_id).load_final())


@pytest.mark.slow  # ~6 s: the tiny encoders
def test_text_stage_phases_stay_under_the_plan(folders, tmp_path, monkeypatch):
    """The runner frees Qwen2.5-VL (and byT5) before it loads SigLIP and the VAE, as the plan counts
    the two phases one after the other; each phase's measured peak (PeakTracker, float32 on the
    CPU: twice the plan's 16-bit bytes) stays under its prediction. Measured: text phase 9.3 MB
    against 317 MB (the 13B formula's 32 float32 score matrices, an upper bound for the tiny Qwen),
    image phase 1.1 MB against 5.5 MB."""
    root = folders["480p_i2v"]
    image = write_image(tmp_path / "first.png", 70, 45)
    run, files, found = start_run(i2v_options(root, tmp_path / "runs", image))
    tracker, llm, phase_peaks = PeakTracker(), [], []
    text_encoder, image_encoder = Stages.v15_text_encoder, Stages.v15_image_encoder

    def keep_ref(self):
        encoder = text_encoder(self)
        llm.append(weakref.ref(encoder.llm))
        return encoder

    def second_phase(self):
        assert llm and llm[0]() is None, "Qwen2.5-VL is still alive when SigLIP loads"
        phase_peaks.append(tracker.peak_bytes)
        tracker.reset_peak()
        return image_encoder(self)

    monkeypatch.setattr(Stages, "v15_text_encoder", keep_ref)
    monkeypatch.setattr(Stages, "v15_image_encoder", second_phase)
    with tracker:
        _Execution([run], files, found, Reporter(), StopRequest()).encode([run])
    phase_peaks.append(tracker.peak_bytes)

    sizes = model_sizes(files, (run.settings["height"], run.settings["width"]))
    phases = [plan(STREAMED, run.settings["width"], run.settings["height"], 9,
                   **{**sizes, "text_encoders": tuple(e for e in sizes["text_encoders"] if e.phase == p),
                      **({} if p else {"image_size": None})}).stages["text"] for p in (0, 1)]
    assert "llm" not in phases[1].parts and "image encode" in phases[1].parts
    assert found.stages["text"].vram_bytes == max(phase.vram_bytes for phase in phases)
    for measured, predicted in zip(phase_peaks, phases):
        assert measured <= 2 * predicted.vram_bytes


def test_bad_input_is_refused_before_a_model_loads(folders, tmp_path):
    image = write_image(tmp_path / "first.png", 70, 45)
    done = invoke("generate", PROMPT, "--model-dir", folders["480p_t2v"], "--runs-dir", tmp_path, "--image", image,
                  "--device", "cpu", "--frames", 9)
    assert done.exit_code == 2 and "--image needs a HunyuanVideo-1.5 image-to-video transformer" in done.stderr
    assert "holds the 480p_t2v transformer" in done.stderr
    done = invoke("generate", PROMPT, "--model-dir", folders["480p_i2v"], "--runs-dir", tmp_path, "--device", "cpu", "--frames", 9)
    assert done.exit_code == 2 and "pass --image PATH" in done.stderr
    done = invoke("generate", PROMPT, "--model-dir", folders["480p_i2v"], "--runs-dir", tmp_path, "--image", image,
                  "--device", "cpu", "--frames", 1)
    assert done.exit_code == 2 and "--frames 1 with --image" in done.stderr
    no_siglip = tmp_path / "no-siglip"
    shutil.copytree(folders["480p_i2v"], no_siglip, ignore=shutil.ignore_patterns("feature_extractor"))
    with pytest.raises(HyVideoError, match="needs the SigLIP vision encoder"):
        start_run(i2v_options(no_siglip, tmp_path / "runs", image))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow  # 5-7 s on the loaded 2-core machine (building both tiny VAEs), not the 4 tiles
def test_tiled_image_encode_matches_diffusers_tiled_encode():
    """The 1.5 VAE's image encode in 64 px tiles (the profile tile 8 at 16x: 4 latents, every 48 px,
    blended over 1 latent) equals diffusers' `tiled_encode` with the same tile; float32, the same
    ops tile by tile (observed 2.0e-7; the untiled encode is 0.66 away, so a tile or blend
    off by one shows)."""
    from hyvideo.v15_config import V15_VAE_CONFIGS
    from hyvideo.v15_keys import vae_ours_to_diffusers
    from hyvideo.v15_vae import HunyuanVideo15VAE
    from lowvram.tiled_vae import TiledVAE, spatial_tile_for
    from tests.helpers import randomize_

    vae = HunyuanVideo15VAE(V15_VAE_CONFIGS["tiny"]).eval()
    randomize_(vae, seed=3)
    reference = AutoencoderKLHunyuanVideo15(**V15_VAE_CONFIGS["tiny"].to_diffusers()).eval()
    reference.load_state_dict(vae_ours_to_diffusers(vae.state_dict()), strict=True)
    reference.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_latent_min_height=4, tile_latent_min_width=4)
    pixels = torch.rand(1, 3, 1, 80, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tiles = []
    with torch.no_grad():
        ours = TiledVAE(vae, spatial_tile_for(8, 16), on_tile=lambda done, total: tiles.append(total)).encode(pixels)
        expected = reference.encode(pixels).latent_dist.mode()
    assert tiles[-1] == 2 * 2 and rel_err(ours, expected) <= 1e-5


@pytest.mark.slow  # ~25 s: two runs as processes, at the real 480p bucket (the 64 px one is patched in this process only)
def test_i2v_on_two_ranks_equals_one_process(folders, tmp_path):
    """`--gpus 2 --image` on 1.5: rank 0 encodes the image once and sends its latents and SigLIP
    states with the clip; every rank feeds them to its share of both CFG forwards. The final
    latents equal one process's within the --gpus bound (tests/test_cli_multigpu.py: 1e-4)."""
    pytest.importorskip("yunchang")
    from tests.helpers import final_latents, run

    image = write_image(tmp_path / "first.png", 70, 45)
    args = ["generate", PROMPT, "--image", image, "--model-dir", folders["480p_i2v"], "--frames", 5, "--steps", 2,
            "--seed", 3, "--device", "cpu", "--json"]
    one, two = run(*args, "--runs-dir", tmp_path / "one"), run(*args, "--runs-dir", tmp_path / "two", "--gpus", 2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    torch.testing.assert_close(final_latents(two.stdout), final_latents(one.stdout), rtol=0, atol=1e-4)
