"""Image-to-video end to end, from an image file, against diffusers' HunyuanVideoImageToVideoPipeline
(the oracle): tiny random DiT (both conditioning types), VAE, LLaVA and CLIP, the same weights
loaded into both; float32 on the CPU."""

import numpy as np
import pytest
import torch
pytest.importorskip("diffusers")  # the oracle: `pytest -m cuda` collects without it (tests/test_cuda_collection.py)
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from hyvideo.config import DIT_CONFIGS, VAE_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.image import image_to_pixels, open_image, resize_center_crop
from hyvideo.pipeline import (
    GenerationRequest,
    ImageCondition,
    denoise,
    encode_image,
    image_initial_latents,
)
from hyvideo.sampler import initial_noise
from hyvideo.text_encoder import (
    IMAGE_EMBED_INTERLEAVE,
    PROMPT_TEMPLATE_I2V,
    ClipTextEncoder,
    LlavaTextEncoder,
    encode_prompts,
)
from hyvideo.vae import CausalVAE, latent_shape
from lowvram.setup.synthetic_checkpoint import write_text_encoder
from tests.diffusers_oracle import diffusers_transformer
from tests.diffusers_oracle import diffusers_vae
from tests.helpers import randomize_
from tests.tiny_llava import tiny_llava

HEIGHT, WIDTH, FRAMES = 32, 48, 9  # latents 3 x 4 x 6: 18 image tokens, 6 of them the first frame's
TEXT_LEN = 40
PROMPT = "A cat walks on the grass."
# float32 end to end. Measured: the VAE latent and LLaVA states are bit-identical to diffusers', the
# DiT agrees to ~4e-7 per forward; with flow shift 1 (both schedules then the same float32
# numbers) the final latents agree to ~1.6e-7, with shift 7 or 17 to ~5e-6, all of it from the
# schedule (we shift in float64 and round once, diffusers shifts in float32: sigmas differ by ~1e-7,
# timesteps by ~1e-4; tests/test_sampler.py). A wrong rule (modulation, frame replaced or not, mask,
# interleave) shows as >1e-2.
REL_TOL = {1.0: 1e-6, 7.0: 1e-5, 17.0: 1e-5}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """VAE, LLaVA and CLIP (random, the same for both sides) and an image file of the bucket's size
    (so diffusers' own resize is the identity and both sides see the same pixels)."""
    root = tmp_path_factory.mktemp("i2v")
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    path = root / "image.png"
    Image.fromarray(np.stack([x * 5, y * 7, (x * y) % 256], -1).astype(np.uint8)).convert("RGBA").save(path)
    vae_oracle = diffusers_vae(VAE_CONFIGS["tiny"])
    randomize_(vae_oracle, seed=10)
    vae = CausalVAE(VAE_CONFIGS["tiny"]).eval()
    vae.load_state_dict(vae_oracle.state_dict(), strict=True)
    clip_folder = write_text_encoder(root / "text_encoder_2", "clip")
    return {"path": path, "vae": vae, "vae_oracle": vae_oracle, "llava": tiny_llava(seed=11), "clip_folder": clip_folder}


def run_ours(shared, dit, request):
    kind = dit.config.image_condition_type
    model, tokenizer, processor = shared["llava"]
    llava = LlavaTextEncoder(model.model, tokenizer, processor, IMAGE_EMBED_INTERLEAVE[kind], text_len=TEXT_LEN)
    clip = ClipTextEncoder.from_folder(shared["clip_folder"], dtype=torch.float32)
    image = open_image(shared["path"])
    condition = ImageCondition(kind, encode_image(shared["vae"], image_to_pixels(resize_center_crop(image, (HEIGHT, WIDTH))), "cpu"))
    embeddings = encode_prompts(llava, clip, request.prompt, request.frames, image=image)
    noise = initial_noise((1, *latent_shape(FRAMES, HEIGHT, WIDTH, VAE_CONFIGS["tiny"])), request.seed)
    latents = image_initial_latents(noise, condition, stability=True)  # diffusers always runs stability mode
    return denoise(dit, embeddings, latents, request, "cpu", image=condition), noise


def run_diffusers(shared, dit, request, noise):
    model, tokenizer, processor = shared["llava"]
    llava_encoder = LlavaTextEncoder(model.model, tokenizer, processor, 4, text_len=TEXT_LEN)
    start = tokenizer(PROMPT_TEMPLATE_I2V.split("{}")[0])["input_ids"].index(llava_encoder.image_token_id)
    n = llava_encoder.image_tokens
    template = {"template": PROMPT_TEMPLATE_I2V, "crop_start": llava_encoder.crop_start(PROMPT_TEMPLATE_I2V),
                "image_emb_start": start, "image_emb_end": start + n, "image_emb_len": n}
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=model, tokenizer=tokenizer, transformer=diffusers_transformer(dit.config, dit.state_dict()),
        vae=shared["vae_oracle"], scheduler=FlowMatchEulerDiscreteScheduler(shift=request.flow_shift),
        text_encoder_2=CLIPTextModel.from_pretrained(shared["clip_folder"]).eval(),
        tokenizer_2=CLIPTokenizer.from_pretrained(shared["clip_folder"]), image_processor=processor,
    )
    image = Image.open(shared["path"]).convert("RGB")
    return pipe(image=image, prompt=request.prompt, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                num_inference_steps=request.steps, guidance_scale=request.guidance, latents=noise.clone(),
                output_type="latent", prompt_template=template, max_sequence_length=TEXT_LEN).frames


@pytest.mark.slow
@pytest.mark.parametrize("name,guidance", [("tiny-i2v-16ch", 6.0), ("tiny-i2v-33ch", 1.0)])  # each release's guidance
@pytest.mark.parametrize("shift", [1.0, 7.0, 17.0])  # 7: stable, 17: dynamic (official scripts)
def test_final_latents_match_diffusers(shared, name, guidance, shift):
    dit = HunyuanVideoDiT(DIT_CONFIGS[name]).eval()
    randomize_(dit, seed=12)
    request = GenerationRequest(PROMPT, width=WIDTH, height=HEIGHT, frames=FRAMES, steps=3, seed=5, guidance=guidance,
                                flow_shift=shift)
    ours, noise = run_ours(shared, dit, request)
    with torch.no_grad():
        theirs = run_diffusers(shared, dit, request, noise)
    if name == "tiny-i2v-33ch":
        ours = ours[:, :, 1:]  # diffusers returns latent_concat latents without the first frame
    else:  # token_replace: the first frame is the clean image latent, the others moved
        assert not torch.equal(ours[:, :, 1:], noise[:, :, 1:])
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"{name} shift {shift}: max |ours - diffusers| / max |diffusers| = {err:.3e}")
    assert ours.shape == theirs.shape and err <= REL_TOL[shift]


def test_condition_inputs_and_steps():
    """token_replace: the DiT reads the clean image as frame 0 and only later frames step;
    latent_concat: noisy latents | image on frame 0 (zeros after) | mask."""
    image = torch.randn(1, 2, 1, 2, 2)
    latents, velocity = torch.randn(2, 1, 2, 3, 2, 2)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    replace = ImageCondition("token_replace", image)
    assert torch.equal(replace.model_input(latents)[:, :, 0:1], image)
    assert torch.equal(replace.model_input(latents)[:, :, 1:], latents[:, :, 1:])
    stepped = replace.step(latents, velocity, sigmas, 0)
    assert torch.equal(stepped[:, :, :1], image) and torch.equal(stepped[:, :, 1:], latents[:, :, 1:] - 0.5 * velocity[:, :, 1:])
    concat = ImageCondition("latent_concat", image).model_input(latents)
    assert concat.shape == (1, 5, 3, 2, 2)
    assert torch.equal(concat[:, :2], latents) and torch.equal(concat[:, 2:4, :1], image) and not concat[:, 2:4, 1:].any()
    assert concat[:, 4, 0].eq(1).all() and not concat[:, 4, 1:].any()
    assert torch.equal(ImageCondition("latent_concat", image).step(latents, velocity, sigmas, 0), latents - 0.5 * velocity)


def test_stability_mode_keeps_a_thousandth_of_the_image():
    noise, image = torch.randn(1, 2, 3, 2, 2), torch.randn(1, 2, 1, 2, 2)
    condition = ImageCondition("token_replace", image)
    assert image_initial_latents(noise, condition, stability=False) is noise
    mixed = image_initial_latents(noise, condition, stability=True)
    assert torch.allclose(mixed, 0.999 * noise + 0.001 * image, atol=1e-7)  # float32 rounding of 1 - 0.999


def test_the_dit_and_the_image_must_agree():
    dit = HunyuanVideoDiT(DIT_CONFIGS["tiny-i2v-16ch"]).eval()
    request = GenerationRequest(PROMPT, width=16, height=16, frames=1, steps=1)
    with pytest.raises(ValueError, match="token_replace DiT got no image"):
        denoise(dit, None, torch.zeros(1, 16, 1, 2, 2), request, "cpu")
    with pytest.raises(ValueError, match="got a latent_concat image"):
        denoise(dit, None, torch.zeros(1, 16, 1, 2, 2), request, "cpu", image=ImageCondition("latent_concat", torch.zeros(1, 16, 1, 2, 2)))
